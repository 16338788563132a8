"""nmtkit.optim: the fused Adam/SGD updates are torch.optim's, bit for bit, in torch.optim's checkpoint
format, and training no longer imports torch._dynamo."""

import copy
import subprocess
import sys

import pytest
import torch

from nmtkit.optim import SGD, Adam


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (300,), (3, 4))]


def _grads(params, step: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    grads[3 if step % 2 else 1] = None  # a parameter without a gradient is skipped, its state untouched
    return grads


def _step(opt, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


@pytest.mark.parametrize("ours, theirs", [(Adam, torch.optim.Adam), (SGD, torch.optim.SGD)])
def test_updates_equal_torch_optim_fused(ours, theirs):
    a, b = _params(0), _params(0)
    mine, ref = ours(a, lr=0.01), theirs(b, lr=0.01, fused=True)
    for step in range(6):
        if step == 3:  # the learning-rate schedule writes param_groups, as with torch.optim
            for opt in (mine, ref):
                opt.param_groups[0]["lr"] = 0.002
        grads = _grads(a, step)
        _step(mine, a, grads)
        _step(ref, b, grads)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    if ours is Adam:  # Algorithm 1 of Kingma & Ba, checked directly on one element after one step
        p = torch.nn.Parameter(torch.tensor([1.0]))
        opt = Adam([p], lr=0.1)
        _step(opt, [p], [torch.tensor([0.5])])
        m, v = 0.1 * 0.5, 0.001 * 0.25
        m_hat, v_hat = m / (1 - 0.9), v / (1 - 0.999)
        assert p.item() == pytest.approx(1.0 - 0.1 * m_hat / (v_hat ** 0.5 + 1e-8), abs=1e-7)


def test_state_dict_moves_between_torch_optim_and_ours():
    """A run resumed from a checkpoint written by torch.optim.Adam (older nmtkit) continues exactly,
    and ours load into torch.optim.Adam."""
    a, b = _params(1), _params(1)
    ref = torch.optim.Adam(b, lr=0.01, fused=True)
    for step in range(3):
        grads = _grads(a, step)
        _step(ref, b, grads)
        for p, q in zip(a, b):
            p.data.copy_(q)
    mine = Adam(a, lr=0.5)
    mine.load_state_dict(copy.deepcopy(ref.state_dict()))  # as read back from a checkpoint
    assert mine.param_groups[0]["lr"] == 0.01
    back = torch.optim.Adam(_params(1), lr=0.5, fused=True)
    back.load_state_dict(copy.deepcopy(mine.state_dict()))
    assert back.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    for step in range(3, 6):
        grads = _grads(a, step)
        _step(mine, a, grads)
        _step(ref, b, grads)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_state_dict_for_another_model_is_refused():
    mine = Adam(_params(0), lr=0.01)
    other = torch.optim.Adam(_params(0)[:2], lr=0.01)
    with pytest.raises(ValueError, match="does not fit this model's 4 parameters"):
        mine.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="no parameters"):
        Adam([], lr=0.01)


def test_training_does_not_import_dynamo(reverse_data, tmp_path):
    """torch.optim would import torch._dynamo (~1 s, ~72 MiB resident) in every training process."""
    code = ("import atexit, sys; from nmtkit.cli import main; sys.argv = ['nmtkit', *sys.argv[1:]]\n"
            "atexit.register(lambda: print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo', flush=True))\n"
            "main()")
    out = subprocess.run([sys.executable, "-c", code, "train", str(reverse_data), "--save", str(tmp_path / "run"),
                          "--max-steps", "2", "--hidden-size", "16", "--embed-size", "8", "--no-valid-bleu"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "no dynamo"
    assert (tmp_path / "run" / "last.pt").exists()
