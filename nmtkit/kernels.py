"""Step-loop kernels for the recurrent decoders (speed only: every function here computes exactly
what the plain PyTorch expression in its docstring computes; tests/test_speed_paths.py checks it).

Deferred weight gradients. A weight W used at every target step t as y_t = x_t Wᵀ + b gets, from
autograd, one small gradient matmul gy_tᵀ x_t per step plus one full-size accumulation of dW per
step (for a 2048 x 1536 LSTM weight that is 12 MB of memory traffic per step). ``SharedLinear``
instead keeps each step's (x_t, gy_t) and, once every step's backward has run, computes
dW = [gy_1; ...; gy_T]ᵀ [x_1; ...; x_T] and db = Σ gy_t as one large, efficient matmul. The
per-step backward does only dx_t = gy_t W. The engine guarantees the order: the weight's node
waits for every node that consumed its (empty) ``token``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import Function

_DEFER = True  # switched off only to compare with plain autograd (tests, benchmarks)


@contextlib.contextmanager
def plain_autograd():
    """Within this block SharedLinear uses plain autograd (per-step weight gradients)."""
    global _DEFER
    old, _DEFER = _DEFER, False
    try:
        yield
    finally:
        _DEFER = old


class _Bank:
    """Per-step inputs and output gradients of one shared weight, filled during backward."""

    __slots__ = ("x", "gy")

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.gy: list[torch.Tensor] = []


def _mm_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ for x (N, in), W (out, in); batched for x (D, N, in), W (D, out, in)."""
    return x.mm(weight.t()) if weight.dim() == 2 else torch.bmm(x, weight.transpose(1, 2))


class _WeightNode(Function):
    """(W, b) -> an empty token; backward turns the bank into dW, db in one matmul."""

    @staticmethod
    def forward(ctx, weight, bias, bank):
        ctx.bank = bank
        ctx.has_bias = bias is not None
        return weight.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        bank = ctx.bank
        if not bank.gy:
            return None, None, None
        dim = bank.gy[0].dim() - 2  # rows are dim 0 (2-D) or dim 1 (batched 3-D)
        gy = torch.cat(bank.gy, dim) if len(bank.gy) > 1 else bank.gy[0]  # ([D,] N, out)
        x = torch.cat(bank.x, dim) if len(bank.x) > 1 else bank.x[0]  # ([D,] N, in)
        bank.x, bank.gy = [], []
        d_weight = gy.t().mm(x) if dim == 0 else torch.bmm(gy.transpose(1, 2), x)  # ([D,] out, in)
        d_bias = gy.sum(dim) if ctx.has_bias else None
        return d_weight, d_bias, None


class _StepLinear(Function):
    """y = x Wᵀ + b for one step; backward returns dx and files (x, gy) in the bank."""

    @staticmethod
    def forward(ctx, x, weight, bias, token, bank):
        ctx.in_dtype = x.dtype
        x = x.to(weight.dtype).contiguous()
        ctx.save_for_backward(x)
        ctx.weight, ctx.bank = weight, bank
        with torch.autocast("cpu", enabled=False):
            y = _mm_t(x, weight)
            if bias is not None:
                y = y.add_(bias.unsqueeze(-2) if weight.dim() == 3 else bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        gy = gy.to(ctx.weight.dtype).contiguous()
        ctx.bank.x.append(x)
        ctx.bank.gy.append(gy)
        dx = (gy.mm(ctx.weight) if gy.dim() == 2 else torch.bmm(gy, ctx.weight)).to(ctx.in_dtype)
        return dx, None, None, torch.zeros(0, dtype=ctx.weight.dtype), None


class SharedLinear:
    """A weight (and optional bias) applied at every step of a loop: ``self(x)`` = F.linear(x, W, b).

    A 3-D weight (D, out, in) applies D weights to x (D, N, in) at once (both directions of a
    bidirectional RNN). Built once per forward pass from tensors that may be views or casts of parameters (e.g. the
    concatenation [W_x W_h] in the compute dtype). When gradients are needed the weight gradient
    is deferred to one matmul after all steps (see the module docstring); otherwise it is a plain
    addmm.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.defer = _DEFER and torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad))
        if self.defer:
            self.bank = _Bank()
            self.token = _WeightNode.apply(weight, bias, self.bank)
            self.w = weight.detach()
            self.b = None if bias is None else bias.detach()
        else:
            self.w, self.b = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.defer:
            return _StepLinear.apply(x, self.w, self.b, self.token, self.bank)
        x = x.to(self.w.dtype)
        if self.w.dim() == 3:
            y = _mm_t(x, self.w)
            return y if self.b is None else y + self.b.unsqueeze(-2)
        return torch.nn.functional.linear(x, self.w, self.b)


def compute_dtype(default: torch.dtype = torch.float32, device_type: str = "cpu") -> torch.dtype:
    """The matmul dtype under the current autocast of ``device_type`` (bf16) or ``default``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to fp32; fp32 and fp64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.LSTMCell's pointwise part, in fp32: gates (B, 4H) in order i, f, g, o; c (B, H).

    c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),  h' = σ(o) ⊙ tanh(c').
    """
    gates = wide(gates)
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def gru_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """torch.nn.GRUCell's pointwise part, in fp32: r, z = σ(x_r + h_r), σ(x_z + h_z);
    n = tanh(x_n + r ⊙ h_n); h' = (1 − z) ⊙ n + z ⊙ h."""
    xr, xz, xn = wide(x_gates).chunk(3, dim=1)
    hr, hz, hn = wide(h_gates).chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(torch.addcmul(xn, r, hn))
    return torch.lerp(n, h, z)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x (B, S, ...) within its length; padding stays at the end."""
    S = x.size(1)
    pos = torch.arange(S, device=x.device).unsqueeze(0)  # (1, S)
    rev = lengths.to(x.device).unsqueeze(1) - 1 - pos  # (B, S)
    index = torch.where(rev >= 0, rev, pos)  # (B, S)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def lstm_sequence(rnn: torch.nn.LSTM, x: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """What ``rnn(pack_padded_sequence(x, lengths))`` followed by ``pad_packed_sequence`` computes,
    for training: x (B, S, In) batch-first -> out (B, S, D·H) (zeros at padding), (h_n, c_n) each
    (L·D, B, H) in nn.LSTM's order, with the same parameters.

    Why: on CPU, PyTorch's packed-sequence LSTM backward is a per-step loop that zero-fills and
    accumulates the gradient of the whole (tokens, 4H) input projection at every step. Here each
    layer's input projection is one matmul for all steps and both directions, the backward
    direction reads its input reversed within each length, both directions step together as one
    batched matmul whose weight gradient is deferred (SharedLinear), states freeze past each
    sentence's end, and the gates' pointwise part runs in fp32. Dropout between layers as nn.LSTM.
    """
    B, S, _ = x.shape
    D, H, L = (2 if rnn.bidirectional else 1), rnn.hidden_size, rnn.num_layers
    dtype = compute_dtype(x.dtype)
    lengths = lengths.to(x.device)
    valid = torch.arange(S, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
    first_ragged = int(lengths.min())  # from this step on, some sentences have ended
    h_n, c_n, inp = [], [], x
    for layer in range(L):
        sfx = [f"_l{layer}", f"_l{layer}_reverse"][:D]
        w_ih = torch.cat([getattr(rnn, "weight_ih" + s) for s in sfx], 0)  # (D·4H, In)
        bias = torch.cat([getattr(rnn, "bias_ih" + s) + getattr(rnn, "bias_hh" + s) for s in sfx], 0)
        proj = torch.nn.functional.linear(inp.to(dtype), w_ih.to(dtype), bias.to(dtype))  # (B, S, D·4H)
        parts = [proj[..., :4 * H]]
        if D == 2:
            parts.append(reverse_padded(proj[..., 4 * H:], lengths))
        steps = torch.stack(parts, 0).unbind(2)  # S x (D, B, 4H)
        w_hh = torch.stack([getattr(rnn, "weight_hh" + s) for s in sfx], 0).to(dtype)  # (D, 4H, H)
        recur = SharedLinear(w_hh)
        h = x.new_zeros(D, B, H, dtype=torch.promote_types(x.dtype, torch.float32))
        c = torch.zeros_like(h)
        outs = []
        for t in range(S):
            gates = steps[t] if t == 0 else recur(h) + steps[t]  # h_0 = 0
            h_new, c_new = lstm_cell(gates.view(D * B, 4 * H), c.view(D * B, H))
            h_new, c_new = h_new.view(D, B, H), c_new.view(D, B, H)
            if t >= first_ragged:
                keep = valid[:, t].view(1, B, 1)
                h_new, c_new = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        out = torch.stack(outs, 2)  # (D, B, S, H)
        dirs = [out[0]] + ([reverse_padded(out[1], lengths)] if D == 2 else [])
        inp = torch.cat(dirs, -1) * valid.unsqueeze(-1)  # (B, S, D·H)
        h_n.extend(h.unbind(0))
        c_n.extend(c.unbind(0))
        if layer < L - 1 and rnn.dropout and rnn.training:
            inp = torch.nn.functional.dropout(inp, rnn.dropout, True)
    return inp, (torch.stack(h_n), torch.stack(c_n))
