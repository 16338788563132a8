"""nmtkit.native: the fused C kernels compute the LSTM cell's equations (values and gradients,
saturated gates included), are what training and translation use where a compiler exists, and
everything still works, with the same numbers, where they cannot be built."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import pytest
import torch

from nmtkit import kernels, native

needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C compiler: the kernels cannot be built")


def lstm_reference(gates: torch.Tensor, extra: torch.Tensor | None, c: torch.Tensor):
    """The cell's equations in fp64 autograd: a = gates + extra; c' = σ(f) c + σ(i) tanh(g); h' = σ(o) tanh(c')."""
    a = gates if extra is None else gates + extra
    i, f, g, o = a.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def test_a_machine_with_a_compiler_gets_the_kernels():
    """CI and developers' machines have cc: there the fast path must really be on."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert native.library() is not None
        assert native.library_path().exists()


@needs_compiler
@pytest.mark.parametrize("scale", [0.5, 4.0, 60.0, 300.0])  # 60, 300: saturated gates, the exp clamp acts
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_lstm_cell_equals_the_equations(scale, with_extra):
    torch.manual_seed(0)
    n, H = 37, 24  # rows not a multiple of anything; H not a multiple of the vector width
    wide = torch.randn(n, 6 * H) * scale  # gates as a row slice of a wider tensor: row stride 6H
    gates = wide[:, H:5 * H]
    extra = torch.randn(n, 4 * H) * scale if with_extra else None
    c_big = torch.randn(n, 2, H) * 3  # c as one layer of (n, L, H): row stride 2H
    c = c_big[:, 1]
    h_new, c_new, s = native.lstm_forward(gates, extra, c)
    want_h, want_c = lstm_reference(gates.double(), None if extra is None else extra.double(), c.double())
    torch.testing.assert_close(h_new.double(), want_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_new.double(), want_c, atol=2e-6 * (1 + want_c.abs().max().item()), rtol=1e-6)

    dh, dc = torch.randn(n, H), torch.randn(n, H)
    d_gates, d_c = native.lstm_backward(dh, dc, s, c, c_new)
    g64 = gates.double().requires_grad_()
    c64 = c.double().requires_grad_()
    h64, cn64 = lstm_reference(g64, None if extra is None else extra.double(), c64)
    want_dg, want_dc = torch.autograd.grad((h64 * dh.double()).sum() + (cn64 * dc.double()).sum(), (g64, c64))
    torch.testing.assert_close(d_gates.double(), want_dg, atol=5e-6, rtol=0)
    torch.testing.assert_close(d_c.double(), want_dc, atol=5e-6, rtol=0)


def gru_reference(x, extra, hg, h):
    """torch.nn.GRUCell's equations in fp64: r, z = σ(a_r + hg_r), σ(a_z + hg_z), a = x + extra;
    n = tanh(a_n + r hg_n); h' = (1 − z) n + z h."""
    a = x if extra is None else x + extra
    ar, az, an = a.chunk(3, dim=1)
    hr, hz, hn = hg.chunk(3, dim=1)
    r, z = torch.sigmoid(ar + hr), torch.sigmoid(az + hz)
    n = torch.tanh(an + r * hn)
    return (1 - z) * n + z * h


@needs_compiler
@pytest.mark.parametrize("scale", [0.5, 4.0, 300.0])
@pytest.mark.parametrize("with_extra", [False, True])
def test_fused_gru_cell_equals_the_equations(scale, with_extra):
    torch.manual_seed(2)
    n, H = 29, 20
    x = (torch.randn(n, 5 * H) * scale)[:, H:4 * H]  # row stride 5H
    extra = torch.randn(n, 3 * H) * scale if with_extra else None
    hg = torch.randn(n, 3 * H) * scale
    h = (torch.randn(n, 2, H))[:, 0]  # row stride 2H
    ins = [x.double().requires_grad_(), None if extra is None else extra.double().requires_grad_(),
           hg.double().requires_grad_(), h.double().requires_grad_()]
    want = gru_reference(*ins)
    got, s = native.gru_forward(x, extra, hg, h)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    dh = torch.randn(n, H)
    d_x, d_hg, d_h = native.gru_backward(dh, s, hg, h)
    wants = torch.autograd.grad((want * dh.double()).sum(), [t for t in ins if t is not None])
    for g_got, g_want in zip((d_x,) + ((d_x,) if with_extra else ()) + (d_hg, d_h), wants):
        torch.testing.assert_close(g_got.double(), g_want, atol=5e-6, rtol=0)


@needs_compiler
def test_fused_gru_cell_autograd_matches_the_pytorch_path():
    torch.manual_seed(3)
    ins = [torch.randn(8, 3 * 6).requires_grad_() for _ in range(3)] + [torch.randn(8, 6).requires_grad_()]
    got = kernels.gru_cell(ins[0], ins[2], ins[3], ins[1])
    assert "Native" in type(got.grad_fn).__name__
    up = torch.randn_like(got)
    grads = torch.autograd.grad((got * up).sum(), ins)
    with native_off():
        want = kernels.gru_cell(ins[0], ins[2], ins[3], ins[1])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for g_got, g_want in zip(grads, torch.autograd.grad((want * up).sum(), ins)):
        torch.testing.assert_close(g_got, g_want, atol=2e-6, rtol=0)


@contextlib.contextmanager
def native_off():
    """kernels' PyTorch path: native.applies answers False within the block."""
    applies = native.applies
    native.applies = lambda *tensors, **kw: False
    try:
        yield
    finally:
        native.applies = applies


@needs_compiler
def test_fused_lstm_cell_autograd_matches_the_pytorch_path():
    """kernels.lstm_cell through the C kernels == through PyTorch ops (_LSTMCell), values and
    gradients of all three inputs, also when one output gets no gradient."""
    torch.manual_seed(1)
    gates = (torch.randn(16, 4 * 8) * 3).requires_grad_()
    extra = torch.randn(16, 4 * 8).requires_grad_()
    c = torch.randn(16, 8).requires_grad_()
    h, c_new = kernels.lstm_cell(gates, c, extra)
    assert c_new.grad_fn is not None and "Native" in type(c_new.grad_fn).__name__
    up = torch.randn_like(h)
    got = torch.autograd.grad((h * up).sum() + c_new.sum(), (gates, extra, c))
    want_h, want_c = kernels._LSTMCell.apply(gates + extra, c)
    torch.testing.assert_close(h, want_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_new, want_c, atol=1e-6, rtol=0)
    want = torch.autograd.grad((want_h * up).sum() + want_c.sum(), (gates, extra, c))
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, atol=2e-6, rtol=0)
    only_h = torch.autograd.grad(kernels.lstm_cell(gates, c)[0].sum(), c)[0]  # c' unused: dc' is None
    torch.testing.assert_close(only_h, torch.autograd.grad(kernels._LSTMCell.apply(gates, c)[0].sum(), c)[0],
                               atol=2e-6, rtol=0)


def bf16_edge_values() -> torch.Tensor:
    """fp32 values across the exponent range, ties at bf16 precision, ±inf, NaN, ±0 and denormals."""
    torch.manual_seed(4)
    vals = torch.cat([torch.randn(2000) * torch.exp2(torch.randint(-120, 120, (2000,)).float()),
                      torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8,
                                    -(1 + 2**-8), 2**-130, 3 * 2**-140, 2**-126 * (1 - 2**-7)])])
    return torch.where(vals.abs() < 2**-126, (vals / 2**-147).round() * 2**-147, vals)  # denormals: 4-ulp steps


@needs_compiler
def test_lstm_cell_reads_bf16_and_rounds_its_gradient_as_torch():
    """bf16 gates and extra are widened exactly (same h', c' as their fp32 values); the gradient in
    bf16 is the fp32 gradient rounded as torch's .to(bfloat16) rounds (ties to even, NaN, inf,
    denormals), i.e. what the cast after an fp32 cell gave before."""
    torch.manual_seed(5)
    n, H = 21, 40
    gates, extra, c = (torch.randn(n, 4 * H) * 4).bfloat16(), torch.randn(n, 4 * H).bfloat16(), torch.randn(n, H)
    got = native.lstm_forward(gates, extra, c)
    for g, w in zip(got, native.lstm_forward(gates.float(), extra.float(), c)):
        assert torch.equal(g, w)
    dh, dc = torch.randn(n, H), torch.randn(n, H)
    d16, dc16 = native.lstm_backward(dh, dc, got[2], c, got[1], torch.bfloat16)
    d32, dc32 = native.lstm_backward(dh, dc, got[2], c, got[1])
    assert d16.dtype == torch.bfloat16 and torch.equal(d16, d32.bfloat16()) and torch.equal(dc16, dc32)
    # d a_f = dc ⊙ c ⊙ σ(f)(1 − σ(f)) = dc with σ(f) = 1/2, c = 4, dh = 0 (exactly, for normal dc)
    vals = bf16_edge_values()
    s = torch.tensor([0.5, 0.5, 0.0, 0.5]).repeat(len(vals), 1)
    four, zero = torch.full((len(vals), 1), 4.0), torch.zeros(len(vals), 1)
    d_f = native.lstm_backward(zero, vals[:, None].clone(), s, four, zero, torch.bfloat16)[0][:, 1]
    d_f32 = native.lstm_backward(zero, vals[:, None].clone(), s, four, zero)[0][:, 1]
    assert torch.equal(d_f32[vals.isfinite() & (vals.abs() >= 2**-126)], vals[vals.isfinite() & (vals.abs() >= 2**-126)])
    want = d_f32.bfloat16()
    assert bool(((d_f.view(torch.int16) == want.view(torch.int16)) | (d_f.isnan() & want.isnan())).all())


@needs_compiler
@pytest.mark.parametrize("extra_dtype", [torch.bfloat16, torch.float32])
def test_bf16_lstm_cell_autograd_gives_gradients_in_the_inputs_dtypes(extra_dtype):
    """Under autograd, bf16 inputs go to the C cell without casts: their gradients come back bf16,
    equal to the fp32 cell's rounded; an fp32 extra beside bf16 gates gets the unrounded fp32 one."""
    torch.manual_seed(6)
    gates = (torch.randn(16, 4 * 8) * 3).bfloat16().requires_grad_()
    extra = torch.randn(16, 4 * 8).to(extra_dtype).requires_grad_()
    c = torch.randn(16, 8).requires_grad_()
    h, c_new = kernels.lstm_cell(gates, c, extra)
    assert "Native" in type(h.grad_fn).__name__ and h.grad_fn.next_functions[0][0] is not None
    up = torch.randn_like(h)
    got = torch.autograd.grad((h * up).sum() + c_new.sum(), (gates, extra, c))
    wide = [t.detach().float().requires_grad_() for t in (gates, extra, c)]
    want_h, want_c = kernels.lstm_cell(wide[0], wide[2], wide[1])
    assert torch.equal(h, want_h) and torch.equal(c_new, want_c)
    want = torch.autograd.grad((want_h * up).sum() + want_c.sum(), wide)
    assert [g.dtype for g in got] == [torch.bfloat16, extra_dtype, torch.float32]
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


def softmax_reference(z: torch.Tensor, target: torch.Tensor):
    """fp64: per-row lse − z_y, lse − mean z, and softmax(z)."""
    log_p = torch.log_softmax(z.double(), dim=1)
    return -log_p.gather(1, target.unsqueeze(1)).squeeze(1), -log_p.mean(1), log_p.exp()


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 300])  # one thread; rows split over threads
def test_softmax_xent_equals_log_softmax(dtype, rows):
    torch.manual_seed(7)
    V = 1003
    z = (torch.randn(rows, V) * 6 + torch.randn(rows, 1) * 30).to(dtype)  # rows far from 0: the max shift matters
    target = torch.randint(0, V, (rows,))
    want_nll, want_uni, want_p = softmax_reference(z, target)
    p_sum = torch.full((V,), 2.0)  # added to
    nll, uni, p = native.softmax_xent(z.clone(), target, True, dtype, p_sum)
    torch.testing.assert_close(nll.double(), want_nll, atol=2e-5 * (1 + want_nll.abs().max().item()), rtol=0)
    torch.testing.assert_close(uni.double(), want_uni, atol=2e-5 * (1 + want_uni.abs().max().item()), rtol=0)
    assert p.dtype == dtype
    if dtype == torch.bfloat16:  # p rounded once from its fp32 value
        torch.testing.assert_close(p.double(), want_p, atol=1e-7, rtol=2**-8)
    else:
        torch.testing.assert_close(p.double(), want_p, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(p_sum.double(), 2 + want_p.sum(0), atol=1e-5, rtol=1e-5)
    # no p wanted: z read through a row stride, nothing written to it, the same losses
    wide = torch.zeros(rows, V + 5, dtype=dtype)
    wide[:, 2:V + 2] = z
    before = wide.clone()
    nll2, uni2, p2 = native.softmax_xent(wide[:, 2:V + 2], target, False, None)
    assert p2 is None and uni2 is None and torch.equal(wide, before) and torch.equal(nll2, nll)


@needs_compiler
def test_softmax_xent_nan_logits_give_nan_loss():
    z = torch.zeros(2, 50)
    z[1, 7] = float("nan")
    nll, _, p = native.softmax_xent(z, torch.tensor([1, 1]), False, torch.float32)
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1]) and torch.isnan(p[1]).all()
    with pytest.raises(ValueError, match="fp32 or bf16"):
        native.softmax_xent(torch.zeros(2, 50), torch.tensor([1, 1]), False, torch.float16)


@needs_compiler
def test_nan_gates_give_nan_like_pytorch():
    gates = torch.zeros(2, 4 * 3)
    gates[1, 0] = float("nan")
    h, c_new, _ = native.lstm_forward(gates, None, torch.zeros(2, 3))
    assert torch.isfinite(h[0]).all() and torch.isnan(h[1, 0]) and torch.isnan(c_new[1, 0])


SRC, LENGTHS = torch.randint(4, 20, (3, 5)), torch.tensor([5, 4, 2])
TGT = torch.randint(4, 20, (3, 6))


def trained_with_counted_calls(monkeypatch, kernel: str, **model):
    """One training step of a small 2-layer fp32 model, counting the calls of ``native.<kernel>``
    -> (model, calls: per call, whether a precomputed extra input was fused in)."""
    from nmtkit.config import ModelConfig
    from nmtkit.model import build_model

    calls = []
    forward = getattr(native, kernel)
    monkeypatch.setattr(native, kernel, lambda *a: calls.append(a[1] is not None) or forward(*a))
    torch.manual_seed(0)
    net = build_model(ModelConfig(encoder="birnn", layers=2, hidden_size=8, embed_size=5, dropout=0.0,
                                  src_vocab_size=20, tgt_vocab_size=20, **model))
    net(SRC, LENGTHS, TGT, TGT)[0].backward()
    return net, calls


@needs_compiler
def test_training_and_translation_steps_use_the_kernels(monkeypatch):
    """The decoder's step (layer 0 with its precomputed input) and the training encoder go through them."""
    model, calls = trained_with_counted_calls(monkeypatch, "lstm_forward", decoder="luong",
                                              attention="luong-general", rnn="lstm")
    assert len(calls) > 10 and any(calls) and not all(calls)  # with and without the fused extra input
    calls.clear()
    with torch.no_grad():
        model.eval()
        model.step(model.encode(SRC, LENGTHS), TGT[:, 0], 1)
    assert calls


@needs_compiler
def test_gru_decoder_steps_use_the_kernels(monkeypatch):
    _, calls = trained_with_counted_calls(monkeypatch, "gru_forward", decoder="bahdanau", attention="bahdanau",
                                          rnn="gru", maxout_size=3)
    assert len(calls) == 2 * 6 and calls.count(True) == 6  # layer 0 adds the embedding's projection


def test_without_a_compiler_everything_falls_back(tmp_path):
    """No compiler: one line on stderr, library() None, and lstm_cell gives the same numbers
    through PyTorch ops."""
    code = (
        "import torch; from nmtkit import native, kernels\n"
        "assert native.library() is None\n"
        "torch.manual_seed(0); g = torch.randn(4, 8, requires_grad=True); c = torch.randn(4, 2)\n"
        "h, cn = kernels.lstm_cell(g, c); h.sum().backward()\n"
        "print(float(h.detach().sum()), float(g.grad.abs().sum()))\n"
    )
    env_base = {"PATH": "/usr/bin:/bin", "NMTKIT_CACHE": str(tmp_path)}
    broken = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env_base, "CC": str(tmp_path / "no-such-cc")})
    assert broken.returncode == 0, broken.stderr
    assert "fused C kernels unavailable" in broken.stderr and broken.stderr.count("\n") == 1
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env_base, "NMTKIT_NATIVE": "0"})
    assert off.returncode == 0 and off.stderr == ""
    assert off.stdout == broken.stdout
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 300])  # one thread; rows split over threads
def test_accumulate_equals_torch_add(dtype, rows):
    torch.manual_seed(3)
    acc = torch.randn(rows, 70)[:, 3:67]  # a row stride wider than the row
    x = torch.randn(rows, 80).to(dtype)[:, 5:69]
    want = acc.clone().add_(x)
    assert native.accumulate(acc, x) is acc
    assert torch.equal(acc, want)  # widening is exact: one fp32 addition per element, as torch's
    with pytest.raises(ValueError, match="fp32 of the same shape"):
        native.accumulate(acc[:-1], x)
