"""The fast paths compute what the plain ones compute.

- kernels.linear / kernels.Linear (fp32 through oneDNN, packed weights) == F.linear, values and
  gradients; kernels.tanh == torch.tanh; kernels.dropout has F.dropout's distribution, and its
  gradient goes through the same mask;
- kernels.SharedLinear (deferred weight gradients) == F.linear step by step, values and gradients;
- the decoder's fused LSTM/GRU step == torch.nn.LSTMCell / GRUCell with the same weights, also
  after fuse_for_inference;
- kernels.lstm_sequence (training encoder) == nn.LSTM over packed sequences, values and gradients;
- every decoder's gradients with deferred weight gradients and oneDNN matmuls == plain autograd
  with torch's own matmuls;
- the fused token NLL == F.cross_entropy (with and without label smoothing), values and gradients;
- greedy and beam search == the straightforward reference implementations below; kernels.topk_rows
  (beam search's per-row top-k) == torch.topk;
- bf16 and int8 translation give the fp32 tokens on a trained toy model (tolerance documented);
- bf16 training really runs its matmuls in bf16, on row counts bucketed like the fp32 oneDNN path.

No timing assertions: speed is measured by bench/.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import small_config
from nmtkit.checkpoint import LoadedModel
from nmtkit.config import ModelConfig
from nmtkit.data import DataDir
from nmtkit.decoders import StackedRNN
from nmtkit import kernels
from nmtkit.kernels import Linear, SharedLinear, lstm_sequence, plain_autograd, plain_matmuls
import nmtkit.decoders
import nmtkit.model
from nmtkit.model import build_model, generator_loss
from nmtkit.search import beam_search, greedy_search, max_lengths
from nmtkit.tokenizer import BOS, EOS, PAD
from nmtkit.train import train
from nmtkit.translate import DecodeOptions, autocast, prepare_for_inference, translate_ids

DECODER_SETUPS = [  # (decoder, attention, window, rnn, input_feed)
    ("luong", "luong-general", "global", "lstm", True),
    ("luong", "luong-dot", "local-p", "gru", True),
    ("luong", "luong-concat", "local-m", "lstm", False),
    ("bahdanau", "bahdanau", "global", "gru", True),
    ("bahdanau", "bahdanau", "global", "lstm", True),
    ("none", "none", "global", "lstm", True),
]


def toy_batch(seed: int = 0, vocab: int = 20, tgt_vocab: int = 22):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 6, 5, 3, 2])
    src = torch.randint(4, vocab, (5, 7), generator=gen)
    for i, n in enumerate(lengths):
        src[i, n:] = PAD
    tgt = torch.randint(4, tgt_vocab, (5, 6), generator=gen)
    return src, lengths, tgt


# ----------------------------------------------------------------------------- kernels

needs_onednn = pytest.mark.skipif(kernels._onednn_op() is None, reason="this torch build has no oneDNN linear")


def ran_ops(fn) -> set[str]:
    """Names of the aten/mkldnn ops ``fn()`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((6, 5), True), ((3, 4, 5), True), ((6, 5), False),
                                        ((37, 5), True), ((3, 13, 5), False)])
def test_onednn_linear_equals_f_linear(shape, bias):
    """linear(x, W, b) = x Wᵀ + b through oneDNN: the values and the gradients of x, W, b are
    F.linear's (through MKL) up to float rounding, also where the rows are padded (37, 39 -> 40)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(7, 5, requires_grad=True)
    b = torch.randn(7, requires_grad=True) if bias else None
    upstream = torch.randn(*shape[:-1], 7)
    inputs = [t for t in (x, w, b) if t is not None]

    def run():
        y = kernels.linear(x, w, b)
        return y, torch.autograd.grad((y * upstream).sum(), inputs)

    got, got_grads = run()
    assert "mkldnn::_linear_pointwise" in ran_ops(run)
    with plain_matmuls():
        want, want_grads = run()
        assert "mkldnn::_linear_pointwise" not in ran_ops(run)
    torch.testing.assert_close(got, F.linear(x, w, b))
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg)


def test_row_buckets_bound_the_shapes_and_the_padding():
    """oneDNN sees few distinct row counts (its primitive cache holds ~1 MB per shape) and at
    most 12.5 % padding rows."""
    buckets = [kernels.bucket_rows(m) for m in range(1, 4097)]
    assert all(m <= b <= m * 1.125 for m, b in zip(range(1, 4097), buckets))
    assert buckets[:16] == list(range(1, 17))  # small batches exact
    assert len(set(buckets)) <= 15 + 8 * 9  # 8 per octave above 16
    assert all(kernels.bucket_rows(b) == b for b in buckets)  # a bucket is its own bucket
    below = [kernels.bucket_rows(m, down=True) for m in range(1, 4097)]
    assert all(m / 1.125 <= b <= m and b in buckets for m, b in zip(range(1, 4097), below))


_CACHE_PROBE = """
import sys
import torch
from nmtkit import kernels
if sys.argv[1] == "bound":
    kernels.bound_primitive_cache(2)
w = torch.randn(8, 4)
packed = kernels.pack_weight(w)
for _ in range(2):
    for rows in (1, 2, 3):  # three shapes in turn: a cache of 2 has dropped each before it recurs
        kernels.linear(torch.randn(rows, 4), w, None, packed)
"""


def _env_without_cache_capacity() -> dict[str, str]:
    """This process's environment less any user setting of oneDNN's primitive cache size."""
    return {k: v for k, v in os.environ.items() if not k.endswith("PRIMITIVE_CACHE_CAPACITY")}


def _onednn_cache_hits(mode: str, user_capacity: str | None) -> int:
    """Primitives oneDNN found in its cache while running _CACHE_PROBE in a fresh process."""
    env = _env_without_cache_capacity()
    env["ONEDNN_VERBOSE"] = "profile_create"  # one line per primitive created or found in the cache
    if user_capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user_capacity
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env=env, capture_output=True,
                         text=True, check=True).stdout
    return sum("create:cache_hit" in line for line in out.splitlines())


@needs_onednn
def test_primitive_cache_is_bounded_unless_the_user_chose_its_size():
    assert _onednn_cache_hits("unbound", None) == 3  # oneDNN's own default keeps all three shapes
    assert _onednn_cache_hits("bound", None) == 0
    assert _onednn_cache_hits("bound", "1024") == 3  # the user's setting wins


def test_the_nmtkit_command_bounds_the_primitive_cache_first():
    probe = ("import atexit, os, sys\n"
             "from nmtkit import cli\n"
             "atexit.register(lambda: print('capacity', os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY')))\n"
             "sys.argv = ['nmtkit', '--help']\n"
             "cli.main()\n")
    out = subprocess.run([sys.executable, "-c", probe], env=_env_without_cache_capacity(), capture_output=True,
                         text=True).stdout
    assert out.splitlines()[-1] == f"capacity {kernels.PRIMITIVE_CACHE_CAPACITY}"


@needs_onednn
def test_packed_linear_is_dropped_when_the_weight_changes():
    torch.manual_seed(0)
    layer = Linear(5, 7).requires_grad_(False)
    x = torch.randn(4, 5)
    layer.pack()
    assert layer._packed is None  # packed lazily, at the first call
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is not None
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        layer.weight.mul_(-2)  # an optimizer step, in place
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is None
    assert "_packed" not in layer.state_dict() and set(layer.state_dict()) == {"weight", "bias"}


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("release", [kernels.page_out, kernels.let_go])
def test_releasing_mapped_weights_drops_them_and_keeps_their_values(tmp_path, release):
    """A weight read from a memory-mapped checkpoint leaves the process's resident memory after
    page_out / let_go, and reads back unchanged."""
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(4_000_000, dtype=torch.float32)}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    assert float(w.sum()) == pytest.approx(4_000_000 * 3_999_999 / 2, rel=1e-6)  # every page touched
    before = _mapped_rss_kib(path)
    assert before > 10_000
    release(w, None)
    if _mapped_rss_kib(path) >= before:
        pytest.skip("this kernel does not support the advice")
    assert _mapped_rss_kib(path) < before / 4
    assert torch.equal(w, torch.arange(4_000_000, dtype=torch.float32))
    anon = torch.arange(1000.0)
    release(anon)  # memory not backed by a file: unchanged
    assert torch.equal(anon, torch.arange(1000.0))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("release", [kernels.page_out, kernels.let_go])
def test_releasing_advises_only_file_backed_pages(tmp_path, monkeypatch, release):
    """Only pages of a file mapping are advised (anonymous memory would go to swap, or with
    MADV_DONTNEED be lost), and of a slice of rows only those rows' whole pages."""
    calls = []
    monkeypatch.setattr(kernels, "_madvise", lambda: lambda addr, size, advice: calls.append((addr.value, size.value)))
    release(torch.arange(1_000_000.0), torch.zeros(3, 4, dtype=torch.bfloat16))
    assert calls == []
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000, 4096)}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]  # 16 KiB rows
    release(w[10:20])
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = w[10].data_ptr(), w[20].data_ptr()
    assert calls and all(first <= a and a + n <= last and a % page == 0 for a, n in calls)
    assert sum(n for _, n in calls) >= last - first - 2 * page


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_page_out_with_mappings_read_once_advises_the_same_pages(tmp_path, monkeypatch):
    """``files`` read once (ArgmaxScreen's loop over row blocks) gives the same advice as reading
    /proc/self/maps per call, and only the given mappings are used."""
    calls = []
    monkeypatch.setattr(kernels, "_madvise", lambda: lambda addr, size, advice: calls.append((addr.value, size.value)))
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1000, 4096)}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    kernels.page_out(w[10:20])
    each_time = list(calls)
    calls.clear()
    kernels.page_out(w[10:20], files=kernels._file_mappings())
    assert each_time and calls == each_time
    calls.clear()
    kernels.page_out(w[10:20], files=[])
    assert calls == []


def test_tanh_is_torch_tanh():
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([0.0, 1e-30, -1e-7, 1e-4])]).requires_grad_()
    got, want = kernels.tanh(x), torch.tanh(x)
    assert (got - want).abs().max() <= 2.4e-7
    g_got, = torch.autograd.grad(got.sum(), x)
    g_want, = torch.autograd.grad(want.sum(), x)
    assert (g_got - g_want).abs().max() <= 1e-6


@pytest.mark.parametrize("p", [0.3, 0.5, 0.1])
def test_dropout_keeps_one_minus_p_scaled_and_backpropagates_through_the_same_mask(p):
    torch.manual_seed(0)
    q = kernels.keep_probability(p)
    assert abs(q - (1 - p)) <= 2.0 ** -17 and (q * 2**16).is_integer()
    x = (torch.rand(400, 500) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    y = kernels.dropout(x, p)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - q) < 4 * math.sqrt(q * (1 - q) / n)  # 4 standard errors
    torch.testing.assert_close(y[kept], x[kept] / q)
    up = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * up).sum(), x)
    torch.testing.assert_close(grad, up * kept / q)
    assert kernels.dropout(x, p, training=False) is x
    mask = kernels.dropout_mask((400, 500), p)
    values = mask.unique()
    assert values[0] == 0 and len(values) == 2 and math.isclose(values[1].item(), 1 / q, rel_tol=1e-6)
    assert abs((mask != 0).float().mean().item() - q) < 4 * math.sqrt(q * (1 - q) / n)
    module = kernels.Dropout(p).eval()
    assert torch.equal(module(x), x) and module.state_dict() == {}


def test_dropout_mask_elements_are_independent_and_tiny_rates_keep_everything():
    """The CPU mask packs four elements into each 64-bit random word: neighbours (one word) and
    elements four apart (the same lane of the next word) are kept independently, and every lane is
    kept at the same rate. A rate whose 1 − p rounds to 1 keeps every element."""
    torch.manual_seed(0)
    n, p = 1 << 20, 0.3
    q = kernels.keep_probability(p)
    kept = kernels._kept((n,), p).float()
    se = 4 * math.sqrt(q * (1 - q) / (n // 4))
    for lane in range(4):
        assert abs(kept[lane::4].mean().item() - q) < se
    for gap in (1, 2, 3, 4, 7):  # P(both kept) = q² for independent elements
        both = (kept[:-gap] * kept[gap:]).mean().item()
        assert abs(both - q * q) < 4 * math.sqrt(q * q * (1 - q * q) / (n - gap))
    assert kernels._kept((3, 5), p).shape == (3, 5)  # 15 elements: the last word's lanes in part
    assert kernels._kept((3, 5), 1e-7).all() and kernels.keep_probability(1e-7) == 1.0
    assert torch.equal(kernels.dropout_mask((3, 5), 1e-7), torch.ones(3, 5))


def test_lstm_cell_equals_the_lstm_equations():
    """c' = σ(f) c + σ(i) tanh(g), h' = σ(o) tanh(c'): values and both gradients against autograd
    through the plain expressions, and torch's gradcheck of the hand-written backward (fp64)."""
    torch.manual_seed(0)
    gates = torch.randn(5, 4 * 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    i, f, g, o = gates.chunk(4, dim=1)
    want_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    want_h = torch.sigmoid(o) * torch.tanh(want_c)
    got_h, got_c = kernels.lstm_cell(gates, c)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_c, want_c)
    up_h, up_c = torch.randn_like(want_h), torch.randn_like(want_c)
    want = torch.autograd.grad((want_h * up_h).sum() + (want_c * up_c).sum(), (gates, c))
    got = torch.autograd.grad((got_h * up_h).sum() + (got_c * up_c).sum(), (gates, c))
    for gg, wg in zip(got, want):
        torch.testing.assert_close(gg, wg)
    assert torch.autograd.gradcheck(kernels.lstm_cell, (gates, c))
    kernels.lstm_cell(gates, c)[0].sum().backward()  # h' alone: the unused c' gets a zero gradient
    assert c.grad is not None and torch.isfinite(c.grad).all()


@pytest.mark.parametrize("strided", [False, True])  # True: a slice of the last dim, as lstm_sequence's split
def test_reverse_padded_gradient_is_the_reversed_gradient(strided):
    torch.manual_seed(0)
    whole = torch.randn(3, 5, 4 if strided else 2, requires_grad=True)
    x = whole[..., 2:] if strided else whole
    lengths = torch.tensor([5, 2, 3])
    y = kernels.reverse_padded(x, lengths)
    torch.testing.assert_close(y[1, :2], x[1, :2].flip(0))
    torch.testing.assert_close(y[1, 2:], x[1, 2:])  # padding stays
    index = torch.tensor([[4, 3, 2, 1, 0], [1, 0, 2, 3, 4], [2, 1, 0, 3, 4]])
    ref = x.gather(1, index.unsqueeze(-1).expand_as(x))
    assert torch.equal(y, ref)
    up = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * up).sum(), whole)
    (want,) = torch.autograd.grad((ref * up).sum(), whole)
    assert torch.equal(grad, want)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("steps", [4, 37])  # 37: weight gradients folded at steps 16 and 32, then the rest
def test_shared_linear_equals_linear_values_and_gradients(batched, steps):
    torch.manual_seed(0)
    shape = (2, 8, 5) if batched else (8, 5)
    weight = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(*shape[:-2], 8, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(*shape[:-2], 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(steps)]

    def run(linear):
        h, outs = torch.zeros(*shape[:-2], 3, 8, dtype=torch.float64), []
        for x in xs:  # a recurrence, so that per-step gradients differ
            h = torch.tanh(linear(x) + 0.5 * h)
            outs.append(h)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        return torch.autograd.grad(loss, [weight, bias, *xs])

    def plain(x):
        y = torch.matmul(x, weight.transpose(-1, -2))
        return y + bias.unsqueeze(-2)

    for got, want in zip(run(SharedLinear(weight, bias)), run(plain)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batched", [False, True])
def test_shared_linear_packs_fp32_weights_for_the_forward_only(batched):
    """fp32 on the CPU: the forward products use W packed once (oneDNN's blocked layout), with the
    same values as the plain product; the pack is dropped when the backward starts, and values and
    gradients equal fp64's up to fp32 rounding."""
    if kernels._onednn_op() is None:
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(1)
    shape = (2, 16, 12) if batched else (16, 12)
    weight = torch.randn(*shape, requires_grad=True)
    xs = [torch.randn(*shape[:-2], 9, 12, requires_grad=True) for _ in range(20)]  # 9 rows: ≥ ONEDNN_MIN_ROWS
    shared = SharedLinear(weight)
    ys = [shared(x) for x in xs]
    assert shared.packs.packed is not None and len(shared.packs.packed) == (2 if batched else 1)
    for x, y in zip(xs, ys):
        assert torch.equal(y, torch.stack([kernels.linear(x[d], weight[d]) for d in range(2)]) if batched
                           else kernels.linear(x, weight))
    ups = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(sum((y * u).sum() for y, u in zip(ys, ups)), [weight, *xs])
    assert shared.packs.packed is None
    w64 = weight.detach().double().requires_grad_()
    x64 = [x.detach().double().requires_grad_() for x in xs]
    want = torch.autograd.grad(sum((torch.matmul(x, w64.transpose(-1, -2)) * u.double()).sum() for x, u in zip(x64, ups)),
                               [w64, *x64])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-5)


def _stacked(rnn: str, extra: int = 6) -> StackedRNN:
    torch.manual_seed(0)
    return StackedRNN(rnn, input_size=4, extra_size=extra, hidden_size=5, layers=2, dropout=0.0).eval()


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("fused", [False, "plain", "packed"])
def test_stacked_step_equals_torch_cells(rnn, fused):
    """Layer 0 sees [x; extra]; layer 1 sees layer 0's output: torch cells with the same weights.
    Fused LSTM layers hold [W_x W_h] plainly or (oneDNN) only in blocked layout."""
    stack = _stacked(rnn)
    cell_class = torch.nn.LSTMCell if rnn == "lstm" else torch.nn.GRUCell
    cells = [cell_class(4 + 6, 5), cell_class(5, 5)]
    with torch.no_grad():
        cells[0].weight_ih.copy_(torch.cat([stack.embed_proj.weight, stack.extra_proj.weight], 1))
        cells[0].bias_ih.copy_(stack.embed_proj.bias)
        cells[1].weight_ih.copy_(stack.input_proj[0].weight)
        cells[1].bias_ih.copy_(stack.input_proj[0].bias)
        for layer in range(2):
            cells[layer].weight_hh.copy_(stack.hidden_proj[layer].weight)
            cells[layer].bias_hh.copy_(stack.hidden_proj[layer].bias)
    if fused:
        stack.fuse_for_inference(pack=fused == "packed")
        if rnn == "lstm" and fused == "packed" and kernels._onednn_op() is not None:
            assert all(isinstance(m, kernels.PackedLinear) and not hasattr(m, "weight") for m in stack.fused)
    x, extra = torch.randn(3, 4), torch.randn(3, 6)
    h, c = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    with torch.no_grad():
        new_h, new_c = stack.step(stack.embed_proj(x), extra, h, c if rnn == "lstm" else None)
        inp = torch.cat([x, extra], 1)
        for layer, cell in enumerate(cells):
            if rnn == "lstm":
                want_h, want_c = cell(inp, (h[:, layer], c[:, layer]))
                torch.testing.assert_close(new_c[:, layer], want_c)
            else:
                want_h = cell(inp, h[:, layer])
            torch.testing.assert_close(new_h[:, layer], want_h)
            inp = want_h


def test_fused_layers_are_not_saved():
    stack = _stacked("lstm")
    keys = set(stack.state_dict())
    stack.fuse_for_inference()
    assert set(stack.state_dict()) == keys


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_sequence_equals_packed_lstm(bidirectional):
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=bidirectional)
    x = torch.randn(4, 7, 6, requires_grad=True)
    lengths = torch.tensor([7, 3, 5, 1])
    packed_out, (h1, c1) = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out1, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=7)
    out2, (h2, c2) = lstm_sequence(rnn, x, lengths)
    for got, want in ((out2, out1), (h2, h1), (c2, c1)):
        torch.testing.assert_close(got, want)
    weights = [torch.randn_like(t) for t in (out1, h1, c1)]
    params = [x, *rnn.parameters()]
    grads1 = torch.autograd.grad(sum((t * w).sum() for t, w in zip((out1, h1, c1), weights)), params)
    grads2 = torch.autograd.grad(sum((t * w).sum() for t, w in zip((out2, h2, c2), weights)), params)
    for got, want in zip(grads2, grads1):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("decoder,attention,window,rnn,input_feed", DECODER_SETUPS)
def test_beams_sharing_the_memory_equal_beams_with_copies(decoder, attention, window, rnn, input_feed):
    """Beam search's state holds each sentence's memory once and its K hypotheses query it together
    (DecoderState.with_beam); every step equals the same hypotheses with the memory copied per row,
    also after hypotheses are reordered and a sentence leaves the batch."""
    cfg = ModelConfig(decoder=decoder, attention=attention, window=window, rnn=rnn, input_feed=input_feed,
                      layers=2, hidden_size=12, embed_size=8, dropout=0.0, src_vocab_size=20,
                      tgt_vocab_size=22)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src, lengths, _ = toy_batch()
    K, B = 3, src.size(0)
    with torch.no_grad():
        shared = model.encode(src, lengths).with_beam(K)
        copies = model.encode(src, lengths).select(torch.arange(B).repeat_interleave(K))
        gen = torch.Generator().manual_seed(1)
        for t in range(1, 6):
            y = torch.randint(4, 22, (shared.hidden["h"].size(0),), generator=gen)
            got, got_a, shared = model.step(shared, y, t)
            want, want_a, copies = model.step(copies, y, t)
            torch.testing.assert_close(got, want)
            if want_a is not None:
                torch.testing.assert_close(got_a, want_a)
            n = K * (B if t < 3 else B - 1)
            order = torch.arange(n) // K * K + torch.randint(0, K, (n,), generator=gen)  # within each sentence
            shared, copies = shared.reorder(order), copies.reorder(order)
            if t == 2:  # sentence 1 leaves
                keep = torch.tensor([0, 2, 3, 4])
                rows = (keep.unsqueeze(1) * K + torch.arange(K)).view(-1)
                shared, copies = shared.select(rows, keep), copies.select(rows)
    assert shared.memory.size(0) == B - 1 and copies.memory.size(0) == K * (B - 1)


def setup_model(decoder, attention, window, rnn, input_feed):
    """A small two-layer model of one DECODER_SETUPS entry, without dropout."""
    cfg = ModelConfig(decoder=decoder, attention=attention, window=window, rnn=rnn, input_feed=input_feed,
                      layers=2, hidden_size=12, embed_size=8, dropout=0.0, src_vocab_size=20,
                      tgt_vocab_size=22)
    torch.manual_seed(0)
    return build_model(cfg)


def loss_and_grads(model, loss_fn):
    """(loss, {parameter name: gradient}) of loss_fn() on model."""
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(got, want):
    torch.testing.assert_close(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], msg=name)


@pytest.mark.parametrize("decoder,attention,window,rnn,input_feed", DECODER_SETUPS)
def test_deferred_gradients_equal_plain_autograd(decoder, attention, window, rnn, input_feed):
    model = setup_model(decoder, attention, window, rnn, input_feed)
    src, lengths, tgt = toy_batch()
    loss = lambda: model(src, lengths, tgt, tgt, 0.1)[0]  # noqa: E731
    fast = loss_and_grads(model, loss)
    with plain_autograd(), plain_matmuls():
        plain = loss_and_grads(model, loss)
    assert_same_loss_and_grads(fast, plain)


@pytest.mark.parametrize("plain,row_step", [(False, 1), (True, 1), (False, 2)])
@pytest.mark.parametrize("decoder,attention,window,rnn,input_feed", DECODER_SETUPS)
def test_training_skips_target_padding(decoder, attention, window, rnn, input_feed, plain, row_step, monkeypatch):
    """The training loss runs the decoder over sentences sorted by target length, dropping them
    after their last step in groups of ``ROW_STEP`` rows: with groups of 1 every step computes
    only real target tokens (rows non-increasing, summing to the token count); loss and gradients
    equal those of the padded step loop."""
    monkeypatch.setattr(nmtkit.decoders, "ROW_STEP", row_step)
    model = setup_model(decoder, attention, window, rnn, input_feed)
    src, lengths, tgt = toy_batch()
    tgt_in, tgt_out = tgt.clone(), tgt.roll(-1, 1)
    for i, n in enumerate([4, 6, 2, 5, 1]):  # target lengths, not in the sources' order
        tgt_in[i, n:] = tgt_out[i, n:] = PAD

    def padded_loss():
        outputs, _ = model.decoder(model.encode(src, lengths), tgt_in)  # (B, T, O): every row, every step
        return generator_loss(outputs, model.generator, tgt_out, 0.1)[0]

    with plain_autograd() if plain else contextlib.nullcontext():
        got = loss_and_grads(model, lambda: model(src, lengths, tgt_in, tgt_out, 0.1)[0])
        want = loss_and_grads(model, padded_loss)
    assert_same_loss_and_grads(got, want)

    rows, step = [], model.decoder.step
    monkeypatch.setattr(model.decoder, "step", lambda state, pre, t: (rows.append(len(state.hidden["h"])),
                                                                        step(state, pre, t))[1])
    model(src, lengths, tgt_in, tgt_out)
    live = [5, 4, 3, 3, 2, 1]  # sentences with more than t target tokens
    assert rows == [min(5, -(-n // row_step) * row_step) for n in live]
    assert row_step > 1 or sum(rows) == int((tgt_out != PAD).sum())


@pytest.mark.parametrize("decoder,attention,deferred", [
    ("luong", "luong-general", {"scores", "context"}), ("luong", "luong-dot", {"scores", "context"}),
    ("luong", "luong-concat", {"context"}), ("bahdanau", "bahdanau", {"context"})])
def test_attention_products_with_the_memory_are_deferred_in_training(decoder, attention, deferred):
    """Under autograd the step loop's products with the memory (q·keysᵀ for bilinear scores, a·memory)
    go through SharedLinear (gradients equal plain autograd's: test above); in search they are plain."""
    cfg = ModelConfig(decoder=decoder, attention=attention, layers=1, hidden_size=12, embed_size=8,
                      dropout=0.0, src_vocab_size=20, tgt_vocab_size=22)
    model = build_model(cfg)
    src, lengths, tgt = toy_batch()
    products = model.encode(src, lengths).plan["attend"]
    assert set(products) == deferred and all(p.defer for p in products.values())
    with torch.no_grad():
        assert model.encode(src, lengths).plan["attend"] == {}
    with plain_autograd():
        assert not any(p.defer for p in model.encode(src, lengths).plan["attend"].values())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [2, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # fp32 on the CPU: the fused C softmax
def test_generator_loss_equals_cross_entropy(smoothing, chunk_rows, dtype, monkeypatch):
    """The chunked output layer + loss (and its gradients computed in forward) equals
    F.cross_entropy over generator(h), padding ignored, whether the rows fit one chunk or not."""
    torch.manual_seed(0)
    vocab = 11
    monkeypatch.setattr(nmtkit.model, "LOSS_CHUNK_ELEMENTS", chunk_rows * vocab)
    calls = []
    fused = nmtkit.native.softmax_xent
    monkeypatch.setattr(nmtkit.native, "softmax_xent", lambda *a: calls.append(a[0].shape) or fused(*a))
    generator = torch.nn.Linear(6, vocab).to(dtype)
    h = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)
    target = torch.randint(1, vocab, (3, 5))
    target[0, 3:] = PAD
    target[2, 1] = target[1, 1]  # a repeated target: its ∂W rows must add up
    loss, nll = generator_loss(h, generator, target, smoothing)
    assert bool(calls) == (dtype == torch.float32 and nmtkit.native.library() is not None)
    flat = (generator(h).view(-1, vocab), target.view(-1))
    want = F.cross_entropy(*flat, ignore_index=PAD, reduction="sum", label_smoothing=smoothing)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(loss, want, **tol)
    torch.testing.assert_close(nll, F.cross_entropy(*flat, ignore_index=PAD, reduction="sum"), **tol)
    params = (h, generator.weight, generator.bias)
    got = torch.autograd.grad(3 * loss, params)
    for g, expected in zip(got, torch.autograd.grad(3 * want, params)):
        torch.testing.assert_close(g, expected, **tol)
    assert not got[0][0, 3:].any()  # padding rows get no gradient
    loss, _ = generator_loss(h, generator, target, smoothing)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the backward reuses its saved buffers
        loss.backward()
    with torch.no_grad():  # validation: the same NLL without the gradient work
        torch.testing.assert_close(generator_loss(h, generator, target)[1], nll)


def test_generator_loss_bf16_close_to_fp32(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(nmtkit.model, "LOSS_CHUNK_ELEMENTS", 5 * 50)  # 28 rows in chunks of 5
    generator = torch.nn.Linear(16, 50)
    h = torch.randn(4, 7, 16, requires_grad=True)
    target = torch.randint(1, 50, (4, 7))
    want, _ = generator_loss(h, generator, target, 0.1)
    want_grads = torch.autograd.grad(want, (h, generator.weight))
    with autocast("bf16"):
        got, _ = generator_loss(h, generator, target, 0.1)
    got_grads = torch.autograd.grad(got, (h, generator.weight))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=2e-2 * w.abs().max().item())


# ----------------------------------------------------------------------------- search

@torch.no_grad()
def reference_greedy(model, src, lengths, max_lens, min_len=0):
    """One sentence at a time, one step at a time: argmax of log p."""
    results = []
    for b in range(src.size(0)):
        state = model.encode(src[b:b + 1, :lengths[b]], lengths[b:b + 1])
        y, out = torch.tensor([BOS]), []
        for t in range(1, int(max_lens[b]) + 1):
            logp, _, state = model.step(state, y, t)
            if t <= min_len:
                logp[:, EOS] = -math.inf
            y = logp.argmax(-1)
            if int(y) == EOS:
                break
            out.append(int(y))
        results.append(out)
    return results


@torch.no_grad()
def reference_beam(model, src, lengths, max_lens, beam, length_penalty=1.0, min_len=0):
    """One sentence at a time with Python lists of hypotheses; the same rules as search.beam_search:
    rank by log p / len^lp (len counts EOS), K best candidates per step, EOS among them ends a
    hypothesis, done after K ended or at the limit (live hypotheses finalised as they stand)."""
    results = []
    for b in range(src.size(0)):
        state = model.encode(src[b:b + 1, :lengths[b]], lengths[b:b + 1])
        state = state.select(torch.zeros(beam, dtype=torch.long))
        live = [(0.0, [])] + [(-math.inf, [])] * (beam - 1)
        finished = []
        y = torch.full((beam,), BOS)
        for t in range(1, int(max_lens[b]) + 1):
            logp, _, state = model.step(state, y, t)
            if t <= min_len:
                logp[:, EOS] = -math.inf
            V = logp.size(1)
            cand = (torch.tensor([s for s, _ in live]).unsqueeze(1) + logp).view(-1)
            top_s, top_i = cand.topk(2 * beam)
            chosen = []
            for rank, (score, idx) in enumerate(zip(top_s.tolist(), top_i.tolist())):
                k, tok = divmod(idx, V)
                if tok == EOS:
                    if rank < beam and score > -math.inf:
                        hyp = live[k][1]
                        finished.append((score / (len(hyp) + 1) ** length_penalty, hyp))
                elif len(chosen) < beam:
                    chosen.append((score, k, tok))
            while len(chosen) < beam:  # fewer than K non-EOS among 2K (only when V is tiny)
                chosen.append((-math.inf, 0, EOS))
            state = state.reorder(torch.tensor([k for _, k, _ in chosen]))
            live = [(s, live[k][1] + [tok]) for s, k, tok in chosen]
            y = torch.tensor([tok for _, _, tok in chosen])
            if len(finished) >= beam:
                break
            if t >= int(max_lens[b]):
                finished += [(s / len(h) ** length_penalty, h) for s, h in live if s > -math.inf]
        results.append(max(finished, key=lambda h: h[0])[1] if finished else [])
    return results


@pytest.fixture(scope="module")
def toy_model(reverse_data, tmp_path_factory):
    """A small luong model trained (briefly) on the reverse task: a checkpoint and test sources."""
    save = tmp_path_factory.mktemp("speed-model")
    config = small_config(layers=2)
    config.train.epochs = 4
    train(reverse_data, save, config, log=lambda m: None)
    data = DataDir(reverse_data).split("test")
    sources = [data.source(i).tolist() for i in range(len(data))]
    return save / "best.pt", sources


def _batch(sources):
    lengths = torch.tensor([len(s) for s in sources])
    src = torch.full((len(sources), int(lengths.max())), PAD, dtype=torch.long)
    for i, s in enumerate(sources):
        src[i, :len(s)] = torch.tensor(s)
    return src, lengths


@pytest.mark.parametrize("V,k", [(10000, 10), (10000, 1), (8192, 10), (10007, 6), (700, 10)])
def test_topk_rows_equals_torch_topk(V, k):
    """Distinct values: the same values and indices as torch.topk, whether the row splits into whole
    blocks or leaves a tail (V = 700 is too short for blocks and goes to torch.topk)."""
    x = torch.randn(24, V, generator=torch.Generator().manual_seed(V)).log_softmax(1)
    x[:, EOS] = -math.inf  # as min_len does
    x[3, 5000 % V] = 50.0  # a row whose best value sits alone in one block
    values, index = kernels.topk_rows(x, k)
    want_values, want_index = x.topk(k, dim=1)
    assert torch.equal(values, want_values) and torch.equal(index, want_index)


def test_topk_rows_with_ties_returns_the_k_largest_values():
    """Many equal values (0..3 only): the values equal torch.topk's, and every index points at a
    distinct entry holding its value."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (16, 5000), generator=gen).float()
    x[0] = 1.0  # a row of one value
    values, index = kernels.topk_rows(x, 10)
    assert torch.equal(values, x.topk(10, dim=1).values)
    assert torch.equal(x.gather(1, index), values)
    assert all(len(set(row)) == 10 for row in index.tolist())


needs_screen = pytest.mark.skipif(not kernels.ArgmaxScreen.applies(torch.ones(2, 2)),
                                  reason="no oneDNN linear or no native bf16 products on this CPU")


def _screen_case(V: int, N: int = 40, K: int = 96, seed: int = 0):
    """A weight, bias and inputs whose logits hold near-ties bf16 cannot resolve: in each row two
    columns apart by ~1e-3 (fp32 resolves that; the screen's bf16 error is ~1e-1) and, for a few
    rows, duplicated weight rows (exactly equal logits: the first must win)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, K, generator=gen) * 0.2
    bias = torch.randn(V, generator=gen) * 0.5
    x = torch.tanh(torch.randn(N, K, generator=gen) * 2)
    z = (x.double() @ weight.double().t() + bias.double())  # (N, V)
    for r in range(N):  # the row's best column gets a rival 1e-3 below or above it
        best, rival = int(z[r].argmax()), (7 * r + 3) % V
        if rival != best:
            x_r = x[r].double()
            shift = (z[r, best] - z[r, rival] + (1e-3 if r % 2 else -1e-3)) / x_r.dot(x_r)
            weight[rival] += (shift * x_r).float()  # changes column ``rival`` only
    weight[V - 1] = weight[5]  # duplicates: equal logits, the first (5) must win
    bias[V - 1] = bias[5]
    return weight, bias, x


@needs_screen
@pytest.mark.parametrize("V", [10000, 1000, 70, 30])
def test_argmax_screen_equals_the_fp32_argmax(V):
    """The bf16 screen gives what argmax over fp32 logits gives (first of equal ones), for
    vocabularies in whole 64-column blocks or not, below one block, with a banned column, with
    near-ties 1e-3 apart and with exact ties."""
    weight, bias, x = _screen_case(V)
    screen = kernels.ArgmaxScreen(weight, bias)
    logits = x @ weight.t() + bias  # (N, V) fp32
    assert torch.equal(screen(x), logits.argmax(1))
    for banned in (EOS, int(logits[0].argmax())):
        assert torch.equal(screen(x, banned), kernels.argmax_logits(logits.clone(), banned))
    x[1:5] = weight[5] / weight[5].norm() * 3  # rows that pick weight row 5 or its duplicate V-1
    logits = x @ weight.t() + bias
    got = screen(x)
    assert torch.equal(got, logits.argmax(1)) and (got[1:5] == 5).all()


@needs_screen
def test_argmax_screen_bound_holds():
    """The screen's per-row bound E_r = rel·||x_r||·max_v||W_v|| + abs covers the error of its bf16
    logits against exact (fp64) ones, entry by entry, on weights far from uniform."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3000, 256, generator=gen) * torch.rand(3000, 1, generator=gen) * 2
    bias = torch.randn(3000, generator=gen) * 3
    x = torch.randn(50, 256, generator=gen) * torch.rand(50, 1, generator=gen) * 4
    screen = kernels.ArgmaxScreen(weight, bias)
    approx = torch.add(bias, F.linear(x.bfloat16(), weight.bfloat16()))  # what the screen compares
    exact = x.double() @ weight.double().t() + bias.double()
    bound = screen.rel * screen.row_norm * x.double().norm(dim=1, keepdim=True) + screen.abs
    err = (approx.double() - exact).abs()
    assert (err <= bound).all()
    assert (err.amax(1, keepdim=True) > bound / 50).all()  # and it is not vacuous


@needs_screen
def test_argmax_screen_gives_up_on_rows_it_cannot_bound():
    weight, bias, x = _screen_case(500)
    x[3, 0] = math.nan
    assert kernels.ArgmaxScreen(weight, bias)(x) is None
    layer = Linear(96, 500).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    layer.pack()
    got = layer.argmax(x)  # screened from the first call; the NaN row plainly
    assert layer._screen is not None and layer._packed is None  # argmax never packs the fp32 copy
    assert torch.equal(got, (x @ weight.t() + bias).argmax(1))
    assert layer.argmax(x[:0]).shape == (0,)
    x = _screen_case(500)[2]  # no NaN; near-ties that bf16 products resolve differently
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the bf16 product's argmax, as before
        want = F.linear(x, layer.weight, layer.bias).float().argmax(1)
        assert torch.equal(layer.argmax(x), want)
    assert not torch.equal(want, (x @ weight.t() + bias).argmax(1))


@torch.no_grad()
def test_beam_over_a_large_vocabulary_equals_reference():
    """A vocabulary large enough for topk_rows' blocks (untrained model: flat, distinct log-probs)."""
    cfg = ModelConfig(layers=1, hidden_size=16, embed_size=8, dropout=0.0, src_vocab_size=20,
                      tgt_vocab_size=3000)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    src, lengths, _ = toy_batch()
    limits = max_lengths(lengths, 1.0)
    assert beam_search(model, src, lengths, limits, 5, 1.0) == reference_beam(model, src, lengths, limits, 5)


@pytest.mark.parametrize("min_len", [0, 9])
def test_greedy_and_beam_equal_reference(toy_model, min_len):
    model = LoadedModel(toy_model[0]).model.eval()
    src, lengths = _batch(toy_model[1][:24])
    limits = max_lengths(lengths, 1.5)
    assert greedy_search(model, src, lengths, limits, min_len) == reference_greedy(model, src, lengths, limits, min_len)
    for beam, lp in ((3, 1.0), (5, 0.6)):
        got = beam_search(model, src, lengths, limits, beam, lp, min_len)
        assert got == reference_beam(model, src, lengths, limits, beam, lp, min_len)


def test_forced_length_gives_exactly_that_many_tokens(toy_model):
    loaded = LoadedModel(toy_model[0])
    for beam in (1, 4):
        opts = DecodeOptions(beam=beam, batch_size=8, min_len=11, max_len=11)
        outs = translate_ids(prepare_for_inference(loaded.model), toy_model[1][:16], opts)
        assert all(len(o) == 11 for o in outs)


@needs_onednn
@pytest.mark.parametrize("beam", [4, 1])
def test_packed_fp32_translation_gives_plain_tokens(toy_model, beam):
    """fp32 translation with oneDNN-packed weights (greedy: through the generator's bf16 argmax
    screen) == torch's own matmuls (fp32 both: only summation order differs, no token of the toy
    task flips)."""
    path, sources = toy_model
    opts = DecodeOptions(beam=beam, batch_size=32, min_len=3 if beam == 1 else 0)
    model = prepare_for_inference(LoadedModel(path).model)
    got = translate_ids(model, sources, opts)
    assert isinstance(model.decoder.rnn.fused[0], kernels.PackedLinear)
    if beam > 1:
        assert model.generator._packed is not None
    elif kernels.ArgmaxScreen.applies(model.generator.weight):
        assert model.generator._screen is not None and model.generator._packed is None
    with plain_matmuls():
        want = translate_ids(prepare_for_inference(LoadedModel(path).model), sources, opts)
    assert got == want


def test_bf16_preparation_converts_every_weight_as_module_to_does(toy_model):
    """prepare_for_inference converts to bf16 one tensor at a time (paging out each fp32 original):
    the same weights as ``model.to(torch.bfloat16)`` but the embedding tables, which stay fp32 and
    give the bf16 table's rows; the encoder's nn.LSTM runs with them."""
    path, sources = toy_model
    model = prepare_for_inference(LoadedModel(path).model, "bf16")
    plain = LoadedModel(path).model.eval()
    want = LoadedModel(path).model.eval()
    want.decoder.rnn.fuse_for_inference()
    want.to(torch.bfloat16)
    got_tensors, want_tensors = dict(model.state_dict()), dict(want.state_dict())
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in got_tensors.items():
        if name.endswith("embed.weight"):
            assert tensor.dtype == torch.float32 and torch.equal(tensor, plain.state_dict()[name]), name
        else:
            assert tensor.dtype == want_tensors[name].dtype and torch.equal(tensor, want_tensors[name]), name
    ids = torch.tensor([[4, 5, 6]])
    for got_embed, want_embed in ((model.encoder.embed, want.encoder.embed), (model.decoder.embed, want.decoder.embed)):
        rows = got_embed(ids)
        assert rows.dtype == torch.bfloat16 and torch.equal(rows, want_embed(ids))
    for got_fused, want_fused in zip(model.decoder.rnn.fused, want.decoder.rnn.fused):
        assert got_fused.weight.dtype == torch.bfloat16 and torch.equal(got_fused.weight, want_fused.weight)
    src, lengths = _batch(sources[:8])
    with torch.no_grad(), autocast("bf16"):
        got_memory, want_memory = model.encode(src, lengths).memory, want.encode(src, lengths).memory
    assert got_memory.dtype == torch.bfloat16
    torch.testing.assert_close(got_memory, want_memory, rtol=0, atol=0)


@pytest.mark.parametrize("precision,quantize", [("bf16", "none"), ("fp32", "int8")])
def test_reduced_precision_translation_gives_fp32_tokens(toy_model, precision, quantize):
    """Tolerance: at least 97% of sentences identical to fp32 (bf16 keeps 8 bits of mantissa,
    int8 weights 8 bits: a near-tie between two tokens can flip); on this task all do."""
    path, sources = toy_model
    opts = DecodeOptions(beam=4, batch_size=32)
    reference = translate_ids(prepare_for_inference(LoadedModel(path).model), sources, opts)
    model = prepare_for_inference(LoadedModel(path).model, precision, quantize)
    opts.precision = precision
    got = translate_ids(model, sources, opts)
    same = sum(a == b for a, b in zip(got, reference)) / len(sources)
    assert same >= 0.97, f"{precision}/{quantize}: only {same:.1%} of sentences equal fp32"
    if quantize == "int8":
        from torch.ao.nn.quantized import dynamic

        modules = list(model.modules())
        assert any(isinstance(m, dynamic.LSTM) for m in modules)
        assert not any(type(m) is torch.nn.Linear for m in modules)  # every Linear is quantized
        assert all(isinstance(m, dynamic.Linear) for m in model.decoder.rnn.fused)


class MatmulDtypes(TorchDispatchMode):
    """Records (dtype, FLOPs) of every matrix multiply that actually runs."""

    def __init__(self):
        super().__init__()
        self.flops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm", "_mkldnn_rnn_layer", "mkldnn_rnn_layer"):
            a = args[1] if name in ("addmm", "baddbmm") else args[0]
            flops = 2 * out.numel() * a.shape[-1] if name != "mkldnn_rnn_layer" else 0
            self.flops[a.dtype] = self.flops.get(a.dtype, 0) + flops
        return out


def test_bf16_training_runs_bf16_matmuls():
    cfg = ModelConfig(layers=2, hidden_size=32, embed_size=16, dropout=0.3, src_vocab_size=20, tgt_vocab_size=22)
    model = build_model(cfg)
    src, lengths, tgt = toy_batch()
    with MatmulDtypes() as record:
        with autocast("bf16"):
            loss, _ = model(src, lengths, tgt, tgt)
        loss.backward()
    total = sum(record.flops.values())
    assert record.flops.get(torch.bfloat16, 0) / total > 0.95, record.flops


class MatmulShapes(TorchDispatchMode):
    """Records the operand shapes of every mm / addmm that actually runs."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a, b = args[1:3] if name == "addmm" else args[:2]
            self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def test_bf16_products_run_on_bucketed_rows_and_equal_torch():
    """torch's bf16 matmuls keep a oneDNN primitive per shape: ``linear`` and ``rows_product`` pad
    the rows (37 -> 40 = bucket_rows(37)) and still compute F.linear and its gradients."""
    torch.manual_seed(0)
    x = torch.randn(37, 24).bfloat16().requires_grad_()
    w = torch.randn(20, 24).bfloat16().requires_grad_()
    b = torch.randn(20).bfloat16().requires_grad_()
    up = torch.randn(37, 20).bfloat16()
    with MatmulShapes() as record:
        got = kernels.linear(x, w, b)
        got_grads = torch.autograd.grad((got * up).sum(), (x, w, b))
    assert kernels.bucket_rows(37) == 40
    assert record.shapes and all(40 in a or 40 in bb for a, bb in record.shapes)  # rows (M or K) padded
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_grads, torch.autograd.grad((want * up).sum(), (x, w, b))):
        torch.testing.assert_close(g, wg)
    a, c = torch.randn(2, 37, 6).bfloat16(), torch.randn(2, 37, 5).bfloat16()
    torch.testing.assert_close(kernels.rows_product(a[0], c[0]), a[0].t().mm(c[0]))
    torch.testing.assert_close(kernels.rows_product(a, c), torch.bmm(a.transpose(1, 2), c))
    with MatmulShapes() as record:
        kernels.rows_product(torch.randn(37, 6), torch.randn(37, 5))  # fp32: MKL, no padding
    assert record.shapes == [((6, 37), (37, 5))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_rows_product_sums_chunk_products_in_a_wide_accumulator(dtype):
    """Σ over chunks of aᵀ b (the output layer's Σ p hᵀ): fp32 and fp64 accumulated in place,
    bf16 products (rows padded to a bucket) added into fp32; equal to the sum in fp64."""
    torch.manual_seed(0)
    chunks = [(torch.randn(n, 9, dtype=dtype), torch.randn(n, 7, dtype=dtype)) for n in (16, 16, 37)]
    with MatmulShapes() as record:
        first = acc = kernels.add_rows_product(None, *chunks[0])
        for a, b in chunks[1:]:
            acc = kernels.add_rows_product(acc, a, b)
    want = sum(a.double().t().mm(b.double()) for a, b in chunks)
    assert acc is first and acc.dtype == kernels.wide(chunks[0][0]).dtype and acc.shape == (9, 7)  # in place
    if dtype == torch.bfloat16:  # each chunk's product rounded to bf16 once, then summed exactly
        want = sum(a.t().mm(b).double() for a, b in chunks)
        assert record.shapes[-1] == ((9, 40), (40, 7))  # 37 rows padded to 40
    else:  # the first product by mm, the others by addmm_ into the accumulator
        assert record.shapes == [((9, 16), (16, 7))]
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)
