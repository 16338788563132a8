"""Seq2Seq = encoder + bridge + decoder + generator, built from a ModelConfig by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nmtkit.attention  # noqa: F401  (registers scores and windows)
import nmtkit.decoders  # noqa: F401  (registers decoders)
import nmtkit.encoders  # noqa: F401  (registers encoders)
from nmtkit.config import ModelConfig
from nmtkit.decoders import DecoderState
from nmtkit.encoders import EncoderOutput
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
        self.proj = nn.ModuleDict({k: nn.Linear(encoder_size, cfg.hidden_size) for k in kinds})

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
        self.generator = nn.Linear(self.decoder.output_size, cfg.tgt_vocab_size)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> DecoderState:
        """src (B, S), lengths (B,) -> the decoder's initial state."""
        enc = self.encoder(src, lengths)
        h0, c0 = self.bridge(enc)
        return self.decoder.init_state(enc, h0, c0)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor, tgt_in: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing -> logits (B, T, V), attention weights (B, T, S) or None."""
        outputs, attn = self.decoder(self.encode(src, lengths), tgt_in)
        return self.generator(outputs), attn

    def step(self, state: DecoderState, y_prev: torch.Tensor, t: int, log_probs: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderState]:
        """One search step: y_prev (B,) at 1-based step t -> log p (B, V) fp32 (or the logits,
        when ``log_probs`` is False: greedy search needs only their argmax), weights (B, S)."""
        out, weights, state = self.decoder.step_tokens(state, y_prev, t)
        logits = self.generator(out).float()
        return (F.log_softmax(logits, dim=-1) if log_probs else logits), weights, state


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


class _TokenNLL(torch.autograd.Function):
    """Summed −log softmax(logits)[target] over non-padding rows (and the label-smoothing term
    Σ −mean_v log p_v), without materialising log p: forward keeps only the logsumexp per row;
    backward writes softmax − one-hot in one pass instead of log_softmax's, gather's (a zero-filled
    (N, V) buffer) and log_softmax-backward's passes over the (N, V) logits."""

    @staticmethod
    def forward(ctx, logits, target):
        x = logits.float()
        lse = torch.logsumexp(x, dim=1)  # (N,)
        keep = target != PAD
        nll = ((lse - x.gather(1, target.unsqueeze(1)).squeeze(1)) * keep).sum()
        uniform = ((lse - x.mean(dim=1)) * keep).sum()
        ctx.save_for_backward(logits, lse, target, keep)
        return nll, uniform

    @staticmethod
    def backward(ctx, g_nll, g_uniform):
        logits, lse, target, keep = ctx.saved_tensors
        V = logits.size(1)
        row = keep.float() * (g_nll + g_uniform)  # (N,) both terms carry softmax
        grad = logits.float().sub(lse.unsqueeze(1)).exp_().mul_(row.unsqueeze(1))  # (N, V)
        if g_uniform.item() != 0:
            grad.sub_((keep.float() * g_uniform / V).unsqueeze(1))
        grad.scatter_add_(1, target.unsqueeze(1), (-keep.float() * g_nll).unsqueeze(1))
        return grad.to(logits.dtype), None


def sequence_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over non-padding tokens, for all steps at once.

    logits (B, T, V), target (B, T) -> (loss to optimise, summed NLL). With label smoothing ε the
    loss is (1 − ε)·NLL + ε·mean_v(−log p_v), as in torch's cross_entropy(label_smoothing=ε).
    """
    nll, uniform = _TokenNLL.apply(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
    if not label_smoothing:
        return nll, nll.detach()
    return (1 - label_smoothing) * nll + label_smoothing * uniform, nll.detach()
