#!/usr/bin/env python3
"""Is training reproducible run to run, and is a stopped + resumed run equal to a straight one?

Uses test_resume's tiny model on the synthetic reverse task (tests/conftest.py), 12 updates, and
prints the largest weight difference for each pair, with torch's default kernels and with
``torch.use_deterministic_algorithms(True)``, for dropout 0 and 0.3. On the CPU every figure is 0;
on a GPU, CUDA's default kernels (atomic adds) make even two straight runs differ.

    python bench/gpu_determinism.py          # trains on the GPU where CUDA sees one
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from conftest import reverse_pairs, write_parallel  # noqa: E402
from nmtkit.checkpoint import load_checkpoint  # noqa: E402
from nmtkit.data import PreprocessOptions, preprocess  # noqa: E402
from nmtkit.train import train  # noqa: E402
from test_resume import resume_config  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp())
    for split, n, seed in (("train", 2000, 1), ("valid", 100, 2), ("test", 200, 3)):
        write_parallel(root / split, reverse_pairs(n, seed))
    data = root / "data"
    preprocess(PreprocessOptions(src="src", tgt="tgt", train=str(root / "train"), valid=str(root / "valid"),
                                 test=str(root / "test"), out=data, vocab_size=40, joint=False, model_type="word",
                                 force=True), log=lambda m: None)
    quiet = lambda m: None  # noqa: E731
    print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")

    def config(dropout: float, **train_values):
        c = resume_config(**train_values)
        c.model.dropout = dropout
        return c

    def weights(run: Path) -> dict[str, torch.Tensor]:
        return load_checkpoint(run / "last.pt")["model"]

    def max_diff(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    for deterministic in (False, True):
        if deterministic:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            torch.use_deterministic_algorithms(True, warn_only=True)
        for dropout in (0.0, 0.3):
            tag = f"{deterministic}-{dropout}"
            for run in ("a", "b"):
                train(data, root / (run + tag), config(dropout, max_steps=12), log=quiet)
            train(data, root / ("s" + tag), config(dropout, max_steps=7), log=quiet)
            train(data, root / ("s" + tag), config(dropout), resume=True, log=quiet,
                  overrides={"train": {"max_steps": 12}})
            a, b, s = (weights(root / (run + tag)) for run in "abs")
            print(f"deterministic algorithms {deterministic}, dropout {dropout}: max |difference| straight vs "
                  f"straight {max_diff(a, b):.3g}, straight vs stopped at 7 + resumed {max_diff(a, s):.3g}")


if __name__ == "__main__":
    main()
