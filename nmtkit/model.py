"""Seq2Seq = encoder + bridge + decoder + generator, built from a ModelConfig by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nmtkit.attention  # noqa: F401  (registers scores and windows)
import nmtkit.decoders  # noqa: F401  (registers decoders)
import nmtkit.encoders  # noqa: F401  (registers encoders)
from nmtkit import native
from nmtkit.config import ModelConfig
from nmtkit.decoders import DecoderState
from nmtkit.encoders import EncoderOutput
from nmtkit.kernels import Linear, add_rows_product, argmax_logits, bucket_rows, compute_dtype, linear, wide
from nmtkit.registry import BRIDGES, DECODERS, ENCODERS
from nmtkit.tokenizer import PAD


# ----------------------------------------------------------------------------- bridges

class Bridge(nn.Module):
    """Initial decoder state (h0, c0), each (B, L, H), from the encoder's final states."""

    def __init__(self, cfg: ModelConfig, encoder_size: int) -> None:
        super().__init__()
        self.layers, self.hidden_size = cfg.layers, cfg.hidden_size

    def forward(self, enc: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.transform(enc.final_h, "h").transpose(0, 1)  # (B, L, H)
        c = None if enc.final_c is None else self.transform(enc.final_c, "c").transpose(0, 1)
        return h.contiguous(), (None if c is None else c.contiguous())

    def transform(self, final: torch.Tensor, which: str) -> torch.Tensor:
        """final (L, B, He) -> (L, B, H)."""
        raise NotImplementedError


@BRIDGES.register("zero")
class ZeroBridge(Bridge):
    """h_0 = 0 (the decoder starts from nothing; attention carries all source information)."""

    def transform(self, final, which):
        return final.new_zeros(self.layers, final.size(1), self.hidden_size)


@BRIDGES.register("last")
class LastBridge(Bridge):
    """h_0 = the encoder's last state per layer (birnn: [→h_S; ←h_1]), as in Luong et al. 2015."""

    def transform(self, final, which):
        return final


@BRIDGES.register("projection")
class ProjectionBridge(Bridge):
    """h_0 = tanh(W [→h_S; ←h_1]) per layer, a learned projection (Joey NMT's 'bridge')."""

    def __init__(self, cfg: ModelConfig, encoder_size: int) -> None:
        super().__init__(cfg, encoder_size)
        kinds = ("h", "c") if cfg.rnn == "lstm" else ("h",)  # a GRU has no cell state to project
        self.proj = nn.ModuleDict({k: Linear(encoder_size, cfg.hidden_size) for k in kinds})

    def transform(self, final, which):
        return torch.tanh(self.proj[which](final))


@BRIDGES.register("backward")
class BackwardBridge(ProjectionBridge):
    """s_0 = tanh(W_s ←h_1) (Bahdanau et al. 2015, App. A.2.2): the backward encoder's state at
    the first source word, per layer (LSTM cells likewise with their own W)."""

    def __init__(self, cfg: ModelConfig, encoder_size: int) -> None:
        super().__init__(cfg, encoder_size // 2)

    def transform(self, final, which):
        half = final.size(-1) // 2
        return torch.tanh(self.proj[which](final[..., half:]))


# ----------------------------------------------------------------------------- model

class Seq2Seq(nn.Module):
    """The whole model; ``generator`` is W_s (Luong eq. 6) / W_o (Bahdanau App. A.2.2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.encoder = ENCODERS.get(cfg.encoder)(cfg)
        self.bridge = BRIDGES.get(cfg.bridge)(cfg, self.encoder.output_size)
        self.decoder = DECODERS.get(cfg.decoder)(cfg, self.encoder.output_size)
        self.generator = Linear(self.decoder.output_size, cfg.tgt_vocab_size)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> DecoderState:
        """src (B, S), lengths (B,) -> the decoder's initial state."""
        enc = self.encoder(src, lengths)
        h0, c0 = self.bridge(enc)
        return self.decoder.init_state(enc, h0, c0)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor | None = None, label_smoothing: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing -> logits (B, T, V), attention weights (B, T, S) or None; given the
        targets tgt_out (B, T) -> (loss, summed NLL) of ``generator_loss`` instead, without ever
        holding the (B, T, V) logits (training and validation go this way)."""
        if tgt_out is None:
            outputs, attn = self.decoder(self.encode(src, lengths), tgt_in)
            return self.generator(outputs), attn
        # the loss is a sum over tokens: sentences reordered by target length, longest first, so
        # that the decoder drops each one after its last step (no work on target padding)
        real = tgt_out != PAD  # (B, T)
        steps, order = real.sum(1).sort(descending=True, stable=True)  # (B,) each
        if not bool((order == torch.arange(len(order), device=order.device)).all()):
            src, lengths, tgt_in, tgt_out, real = (t.index_select(0, order) for t in (src, lengths, tgt_in, tgt_out, real))
        outputs, _ = self.decoder(self.encode(src, lengths), tgt_in, steps)  # (N, O) time-major
        return generator_loss(outputs, self.generator, tgt_out.t()[real.t()], label_smoothing)

    def step(self, state: DecoderState, y_prev: torch.Tensor, t: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderState]:
        """One search step: y_prev (B,) at 1-based step t -> log p (B, V) fp32, weights (B, S)."""
        out, weights, state = self.decoder.step_tokens(state, y_prev, t)
        logits = self.generator(out).float()  # (B, V): this step's own tensor
        if logits.requires_grad:
            return F.log_softmax(logits, dim=-1), weights, state
        # in place (the kernel reads each row whole before writing it): beam search's (B·K, V)
        # step holds one such tensor, not two (fp32 beam 5 peak RSS -6..12 MiB, bench/README.md)
        return torch.log_softmax(logits, dim=-1, out=logits), weights, state

    def greedy_step(self, state: DecoderState, y_prev: torch.Tensor, t: int, banned: int | None = None
                    ) -> tuple[torch.Tensor, DecoderState]:
        """One greedy step: y_prev (B,) -> the most probable next tokens (B,) (never ``banned``),
        the new state. The argmax of the logits, the same as of log p: no log-softmax needed, and
        the fp32 generator answers through its bf16 screen (``kernels.ArgmaxScreen``)."""
        out, _, state = self.decoder.step_tokens(state, y_prev, t)
        if isinstance(self.generator, Linear):
            return self.generator.argmax(out, banned), state
        return argmax_logits(self.generator(out).float(), banned), state  # int8: a quantized module


def build_model(cfg: ModelConfig) -> Seq2Seq:
    cfg.validate()
    return Seq2Seq(cfg)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Turns the in-place initialisers of module constructors into no-ops."""

    SKIP = {"uniform_", "normal_", "zero_", "fill_", "kaiming_uniform_", "xavier_uniform_", "orthogonal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SKIP:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def build_model_for_loading(cfg: ModelConfig) -> Seq2Seq:
    """A model whose parameters are allocated but never initialised (their pages are not even
    touched), for ``load_state_dict(..., assign=True)``: loading a checkpoint then costs neither
    the random initialisation's time nor a second copy of the weights in memory."""
    cfg.validate()
    with _SkipInit():
        return Seq2Seq(cfg)


LOSS_CHUNK_ELEMENTS = 1 << 22  # logits alive at once in the training loss (16 MB in fp32)


class _GeneratorNLL(torch.autograd.Function):
    """The output layer z = W h + b (Luong eq. 6 W_s, Bahdanau A.2.2 W_o) and the summed NLL,
    computed in chunks of rows so that at most LOSS_CHUNK_ELEMENTS logits exist at a time.

    For rows h_i (N, H) with targets y_i, p_i = softmax(z_i) and lse_i = log Σ_v exp z_i[v]:
        nll = Σ_i (lse_i − z_i[y_i]),   uniform = Σ_i (lse_i − mean_v z_i[v])
    (the label-smoothing term, computed only with label smoothing: otherwise 0). Their gradient is linear in the two upstream scalars g_n, g_u:
        ∂/∂z_i = (g_n + g_u) p_i − g_n e_{y_i} − g_u / V, hence
        ∂h_i = (g_n + g_u) p_i W − g_n W[y_i] − g_u mean_v W[v]
        ∂W   = (g_n + g_u) Σ_i p_i h_iᵀ − g_n Σ_i e_{y_i} h_iᵀ − (g_u / V) 1 (Σ_i h_i)ᵀ
        ∂b   = (g_n + g_u) Σ_i p_i − g_n Σ_i e_{y_i} − g_u N / V.
    So forward computes p W, Σ p hᵀ and Σ p chunk by chunk (the matmuls a backward through the
    logits would do anyway, no recomputation) and keeps no logits for backward: training memory no
    longer grows with tokens × vocabulary.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, dtype, need_grad, smoothing):
        # h (N, H) non-padding rows, weight (V, H), bias (V,), target (N,); matmuls in ``dtype``;
        # need_grad: whether to do the gradient work (ctx.needs_input_grad ignores no_grad mode);
        # smoothing: whether to compute ``uniform`` (else it stays 0, and so does its gradient)
        acc = wide(h).dtype  # fp32 (or fp64) for logits and accumulators
        n, v = h.size(0), weight.size(0)
        hc, w, b = h.to(dtype), weight.to(dtype), bias.to(dtype)
        nll = torch.zeros((), dtype=acc, device=h.device)
        uniform = torch.zeros((), dtype=acc, device=h.device)
        if need_grad:
            p_w = torch.empty(n, h.size(1), dtype=acc, device=h.device)  # (N, H) Σ_v p_iv W[v]
            p_h = p_sum = None  # (V, H) Σ_i p_i h_iᵀ and (V,) Σ_i p_i, from the first chunk on
        rows = bucket_rows(max(1, LOSS_CHUNK_ELEMENTS // v), down=True)  # no padded rows but the last chunk's
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(s + rows, n)
                z = linear(hc[s:e], w, b)  # (C, V) logits
                if acc == torch.float32 and native.applies(z, dtypes=native.EITHER):
                    # one C pass per row: the row's max, log-sum-exp, softmax and column sums
                    if need_grad and p_sum is None:
                        p_sum = torch.zeros(v, dtype=acc, device=h.device)
                    nll_rows, uni_rows, pc = native.softmax_xent(z, target[s:e], smoothing, dtype if need_grad else None,
                                                                 p_sum if need_grad else None)
                    nll += nll_rows.sum()
                    if smoothing:
                        uniform += uni_rows.sum()
                else:
                    z = z.to(acc)
                    z_max = z.amax(dim=1, keepdim=True)  # (C, 1)
                    z_y = z.gather(1, target[s:e].unsqueeze(1))  # (C, 1)
                    z_mean = z.mean(dim=1, keepdim=True) if smoothing else None  # (C, 1)
                    p = z.sub_(z_max).exp_()  # (C, V) exp(z − max), in place of z: no (C, V) temporary
                    total = p.sum(dim=1, keepdim=True)  # (C, 1)
                    lse = z_max + total.log()  # (C, 1) log Σ_v exp z_v
                    nll += (lse - z_y).sum()
                    if smoothing:
                        uniform += (lse - z_mean).sum()
                    if need_grad:
                        pc = p.div_(total).to(dtype)  # (C, V) softmax
                        p_sum = p.sum(dim=0) if p_sum is None else p_sum.add_(p.sum(dim=0))
                if need_grad:
                    p_w[s:e] = linear(pc, w.t())  # p W
                    p_h = add_rows_product(p_h, pc, hc[s:e])  # Σ p hᵀ in fp32
        if need_grad:
            ctx.save_for_backward(h, weight, target, p_w, p_h, p_sum)
            ctx.smoothing = smoothing
        return nll, uniform

    @staticmethod
    def backward(ctx, g_n, g_u):
        h, weight, target, p_w, p_h, p_sum = ctx.saved_tensors
        n, v = h.size(0), weight.size(0)
        g_n, g_u = g_n.to(p_w.dtype), g_u.to(p_w.dtype)
        g = g_n + g_u
        d_h = d_w = d_b = None
        if ctx.needs_input_grad[0]:
            w = weight.to(p_w.dtype)
            d_h = p_w * g - g_n * w[target]  # (N, H)
            if ctx.smoothing:
                d_h -= g_u * w.mean(dim=0)
            d_h = d_h.to(h.dtype)
        if ctx.needs_input_grad[1]:  # in place of p_h (V, H): a second backward raises, as autograd does
            hw = h.to(p_h.dtype)
            d_w = p_h.mul_(g).index_add_(0, target, hw * -g_n)  # (V, H)
            if ctx.smoothing:
                d_w.sub_((g_u / v) * hw.sum(dim=0))
            d_w = d_w.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            counts = torch.bincount(target, minlength=v).to(p_sum.dtype)  # (V,)
            d_b = (p_sum * g - g_n * counts - g_u * n / v).to(weight.dtype)
        return d_h, d_w, d_b, None, None, None, None


def generator_loss(outputs: torch.Tensor, generator: nn.Linear, target: torch.Tensor,
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the generator's softmax over non-padding tokens, for all steps at once.

    outputs (B, T, H) decoder outputs, target (B, T) -> (loss to optimise, summed NLL, detached);
    or outputs (N, H), target (N,) without padding (the decoder's packed outputs).
    With label smoothing ε the loss is (1 − ε)·NLL + ε·mean_v(−log p_v), as torch's
    cross_entropy(label_smoothing=ε). Padding rows are dropped before the output layer.
    """
    dtype = compute_dtype(wide(outputs).dtype, outputs.device.type)
    if target.dim() == 1:  # packed: every row a real token
        h, flat = outputs, target
    else:
        rows = (target.reshape(-1) != PAD).nonzero().squeeze(1)  # (N,)
        h = outputs.reshape(-1, outputs.size(-1)).index_select(0, rows)  # (N, H)
        flat = target.reshape(-1).index_select(0, rows)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (h, generator.weight, generator.bias))
    nll, uniform = _GeneratorNLL.apply(h, generator.weight, generator.bias, flat, dtype, need_grad,
                                       bool(label_smoothing))
    if not label_smoothing:
        return nll, nll.detach()
    return (1 - label_smoothing) * nll + label_smoothing * uniform, nll.detach()
