"""The counting behind bench/matmul_share.py's figures: every matrix product is counted once, grouped
by what it multiplies, and each kept example reproduces the product it stands for."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import matmul_share  # noqa: E402
import side_by_side  # noqa: E402


def test_products_are_counted_by_shape_and_nothing_else_is():
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 5, 7)
    counter = matmul_share.CountProducts()
    with counter:
        for _ in range(3):
            torch.mm(x, w.t())
        torch.mm(x[:2], w.t())  # other rows: another group
        torch.bmm(a, b)
        torch.bmm(a, b)
        (x * 2).sum().exp()  # not products
    by_op = sorted((key[0], n) for key, n in counter.count.items())
    assert by_op == [("aten.bmm.default", 2), ("aten.mm.default", 1), ("aten.mm.default", 3)]
    for key, (func, args, kwargs) in counter.example.items():
        out = func(*args, **kwargs)
        expected = torch.bmm(a, b) if "bmm" in key[0] else (x if args[0].size(0) == 4 else x[:2]) @ w.t()
        torch.testing.assert_close(out, expected)
        assert args[1].stride() == (key[1][1][2])  # w.t()'s strides kept: the same kernel path


def test_int8_products_are_grouped_by_their_weight_not_by_call():
    """torch hands the mode a new wrapper of a packed int8 weight at every call; two weights with
    the same input shape must still be told apart (re-timing one for the other would be wrong)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_dynamic(torch.nn.ModuleList([torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)]),
                                 {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(5, 8)
    counter = matmul_share.CountProducts()
    with torch.inference_mode(), counter:
        for _ in range(3):
            model[0](x)
        model[1](x)
    shapes = sorted((matmul_share._shapes(key[1][1]), n) for key, n in counter.count.items())
    assert shapes == [("int8 (4, 8)", 3), ("int8 (6, 8)", 1)]


def test_skip_train_finds_the_onmt_checkpoint_of_the_most_steps(tmp_path):
    """bench/side_by_side.py --skip-train reuses OpenNMT-py's checkpoint whatever --steps trained it
    (it looked for model_step_200.pt after a 100-step run), and says so when there is none."""
    with pytest.raises(SystemExit, match="no OpenNMT-py checkpoint"):
        side_by_side.last_onmt_checkpoint(tmp_path)
    for steps in (20, 100, 9):
        (tmp_path / f"model_step_{steps}.pt").write_bytes(b"")
    assert side_by_side.last_onmt_checkpoint(tmp_path) == str(tmp_path / "model_step_100.pt")
