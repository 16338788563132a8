"""Attention: a score (which source states match the query) times a window (which positions
may be attended to), normalised by a masked softmax into weights a and a context c = Σ_s a_s h̄_s.

Scores (registry ``attention``), query q = h_t (Luong, current target state) or s_{i-1}
(Bahdanau, previous state; the decoder decides which it passes):

- ``luong-dot``       score(h_t, h̄_s) = h_tᵀ h̄_s                      Luong et al. 2015, eq. (8)
- ``luong-general``   score(h_t, h̄_s) = h_tᵀ W_a h̄_s                  Luong et al. 2015, eq. (8)
- ``luong-concat``    score(h_t, h̄_s) = v_aᵀ tanh(W_a [h_t; h̄_s])      Luong et al. 2015, eq. (8)
- ``luong-location``  a_t = softmax(W_a h_t), sliced to the source    Luong et al. 2015, §3.1
- ``bahdanau``        e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j)          Bahdanau et al. 2015, App. A.1.2
- ``none``            no attention (decoder 'none', RNNencdec)

Windows (registry ``window``, Luong et al. 2015 §3.2), positions s = 1..S as in the paper:

- ``global``   every source position.
- ``local-m``  p_t = t (clamped to S), positions with |s − p_t| ≤ D, a_t = align(h_t, h̄_s).
- ``local-p``  p_t = S · sigmoid(v_pᵀ tanh(W_p h_t)) (eq. 9 of §3.2), positions with
               |s − p_t| ≤ D, a_t(s) = align(h_t, h̄_s) · exp(−(s − p_t)² / 2σ²), σ = D/2 (eq. 10),
               where align is the softmax over the window only. As in Luong's own code the result
               is NOT renormalised (it sums to less than 1); ``renormalize_window`` divides by its
               sum instead.

Projections of the encoder states that do not depend on the query (W_a h̄_s, U_a h_j) are
computed once per batch by ``keys`` and kept by the caller (in the decoder state), never on self.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmtkit.config import ModelConfig
from nmtkit.kernels import Linear, SharedLinear, compute_dtype, tanh
from nmtkit.registry import ATTENTIONS, WINDOWS


# ----------------------------------------------------------------------------- scores

class Score(nn.Module):
    """score(q, h̄_s) for every query step and source position."""

    def __init__(self, query_size: int, memory_size: int, cfg: ModelConfig) -> None:
        super().__init__()

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """Query-independent projection of the memory (B, S, Hm) -> (B, S, K); once per batch."""
        return memory

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (B, T, Hq), keys (B, S, K) -> scores (B, T, S)."""
        raise NotImplementedError


class BilinearScore(Score):
    """score = q · keysᵀ, one batched product (dot and general differ only in their keys); a
    decoder's step loop may run it as ``Attention.per_batch``'s "scores" product instead."""

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, T, S)


@ATTENTIONS.register("luong-dot")
class DotScore(BilinearScore):
    """score(h_t, h̄_s) = h_tᵀ h̄_s (Luong et al. 2015 §3.1, eq. 8, 'dot')."""

    def __init__(self, query_size: int, memory_size: int, cfg: ModelConfig) -> None:
        super().__init__(query_size, memory_size, cfg)
        if query_size != memory_size:
            raise ValueError(f"luong-dot needs equal query and memory sizes ({query_size} != {memory_size})")


@ATTENTIONS.register("luong-general")
class GeneralScore(BilinearScore):
    """score(h_t, h̄_s) = h_tᵀ W_a h̄_s (Luong et al. 2015 §3.1, eq. 8, 'general').

    keys = W_a h̄_s (B, S, Hq) is precomputed once per batch.
    """

    def __init__(self, query_size: int, memory_size: int, cfg: ModelConfig) -> None:
        super().__init__(query_size, memory_size, cfg)
        self.W_a = Linear(memory_size, query_size, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.W_a(memory)  # (B, S, Hq)


@ATTENTIONS.register("luong-concat")
class ConcatScore(Score):
    """score(h_t, h̄_s) = v_aᵀ tanh(W_a [h_t; h̄_s]) (Luong et al. 2015 §3.1, eq. 8, 'concat').

    W_a = [W_q  W_k] is split so that W_k h̄_s is precomputed once per batch.
    """

    def __init__(self, query_size: int, memory_size: int, cfg: ModelConfig) -> None:
        super().__init__(query_size, memory_size, cfg)
        size = cfg.hidden_size
        self.W_q = Linear(query_size, size, bias=False)
        self.W_k = Linear(memory_size, size, bias=False)
        self.v_a = Linear(size, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.W_k(memory)  # (B, S, A)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = self.W_q(query)  # (B, T, A)
        hidden = tanh(q.unsqueeze(2) + keys.unsqueeze(1))  # (B, T, S, A)
        return self.v_a(hidden).squeeze(-1)  # (B, T, S)


@ATTENTIONS.register("bahdanau")
class AdditiveScore(ConcatScore):
    """e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j) (Bahdanau et al. 2015, App. A.1.2).

    The same function as 'luong-concat' (W_q = W_a, W_k = U_a); what makes RNNsearch is the query,
    the PREVIOUS decoder state s_{i-1}, which the 'bahdanau' decoder passes.
    """


@ATTENTIONS.register("luong-location")
class LocationScore(Score):
    """a_t = softmax(W_a h_t) (Luong et al. 2015 §3.1, 'location').

    W_a predicts ``max_source_len`` logits from the target state alone; they are sliced to the
    source length. Positions beyond ``max_source_len`` get score −inf (zero weight).
    """

    def __init__(self, query_size: int, memory_size: int, cfg: ModelConfig) -> None:
        super().__init__(query_size, memory_size, cfg)
        self.max_len = cfg.max_source_len
        self.W_a = Linear(query_size, self.max_len, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return memory[:, :, :0]  # (B, S, 0): nothing to precompute, only S is carried

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        S = keys.size(1)
        scores = self.W_a(query)[:, :, :S]  # (B, T, min(S, max_len))
        if S > self.max_len:
            scores = F.pad(scores, (0, S - self.max_len), value=float("-inf"))
        return scores


@ATTENTIONS.register("none")
class NoAttention(Score):
    """No attention: only decoder 'none' (RNNencdec, Bahdanau et al. 2015 §4.2) takes it."""

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("attention 'none' computes no scores")


# ----------------------------------------------------------------------------- windows

class Window(nn.Module):
    """Which positions a step may attend to, and an optional factor on the weights."""

    def __init__(self, query_size: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.D = cfg.window_size

    def forward(self, query: torch.Tensor, steps: torch.Tensor, lengths: torch.Tensor, S: int
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """query (B, T, Hq), steps (T,) 1-based target positions, lengths (B,) ->
        allowed (B, T, S) bool or None (= all), factor (B, T, S) or None (= 1)."""
        return None, None

    def _around(self, center: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """center p_t (B, T) -> positions s (1, 1, S) and mask |s − p_t| ≤ D (B, T, S)."""
        s = torch.arange(1, S + 1, device=center.device, dtype=center.dtype).view(1, 1, S)
        return s, (s - center.unsqueeze(-1)).abs() <= self.D


@WINDOWS.register("global")
class GlobalWindow(Window):
    """Global attention: all source positions (Luong et al. 2015 §3.1)."""


@WINDOWS.register("local-m")
class MonotonicWindow(Window):
    """Local-m: p_t = t, window [p_t − D, p_t + D] (Luong et al. 2015 §3.2).

    p_t is clamped to the source length S so that steps past the end still see the last D+1
    positions (the paper leaves t > S + D undefined).
    """

    def forward(self, query, steps, lengths, S):
        B, T = query.shape[:2]
        center = torch.minimum(steps.to(query.dtype).view(1, T), lengths.to(query.dtype).view(B, 1))
        return self._around(center, S)[1], None


@WINDOWS.register("local-p")
class PredictiveWindow(Window):
    """Local-p: p_t = S · sigmoid(v_pᵀ tanh(W_p h_t)), Gaussian factor exp(−(s − p_t)²/2σ²),
    σ = D/2 (Luong et al. 2015 §3.2, eqs. 9 and 10); S is each sentence's own length."""

    def __init__(self, query_size: int, cfg: ModelConfig) -> None:
        super().__init__(query_size, cfg)
        self.W_p = Linear(query_size, query_size, bias=False)
        self.v_p = Linear(query_size, 1, bias=False)

    def forward(self, query, steps, lengths, S):
        B = query.size(0)
        gate = torch.sigmoid(self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)  # (B, T)
        center = lengths.to(query.dtype).view(B, 1) * gate  # p_t (B, T)
        s, allowed = self._around(center, S)
        sigma = self.D / 2
        factor = torch.exp(-((s - center.unsqueeze(-1)) ** 2) / (2 * sigma**2))  # (B, T, S)
        return allowed, factor


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Score x window -> masked softmax -> weights a (B, T, S) and context Σ_s a_s h̄_s (B, T, Hm)."""

    def __init__(self, score: Score, window: Window, renormalize: bool = False) -> None:
        super().__init__()
        self.score = score
        self.window = window
        self.renormalize = renormalize

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.score.keys(memory)

    def per_batch(self, keys: torch.Tensor, memory: torch.Tensor) -> dict[str, SharedLinear]:
        """For a decoder's step loop under autograd: the products with the memory as SharedLinear
        over one weight per sentence, "context" a·memory and, for a bilinear score (dot, general),
        "scores" q·keysᵀ. Their gradients for keys and memory are then summed over steps by a few
        batched products (one per 16 steps), not by an outer product (B, S, H) and an addition per
        step. Empty without gradients (search: one plain bmm per step)."""
        if not (torch.is_grad_enabled() and (keys.requires_grad or memory.requires_grad)):
            return {}
        dtype = compute_dtype(memory.dtype, memory.device.type)  # bmm's dtype under autocast
        products = {"context": SharedLinear(memory.to(dtype).transpose(1, 2))}  # weight (B, Hm, S)
        if isinstance(self.score, BilinearScore):
            products["scores"] = SharedLinear(keys.to(dtype))  # weight (B, S, K)
        return products

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor, lengths: torch.Tensor, steps: torch.Tensor,
                products: dict[str, SharedLinear] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, Hq), keys (B, S, K), memory (B, S, Hm), mask (B, S), lengths (B,),
        steps (T,) 1-based target positions -> context (B, T, Hm), weights (B, T, S).
        ``products``: ``per_batch(keys, memory)`` (the same functions, gradients deferred)."""
        products = products or {}
        scores = products["scores"](query) if "scores" in products else self.score(query, keys)  # (B, T, S)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # softmax in fp32 under autocast; fp64 stays fp64
        allowed, factor = self.window(query, steps, lengths, memory.size(1))
        valid = mask.unsqueeze(1) if allowed is None else mask.unsqueeze(1) & allowed  # (B, T|1, S)
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        if factor is not None:
            weights = weights * factor
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(memory.dtype)
        context = products["context"](weights) if "context" in products else torch.bmm(weights, memory)
        return context, weights  # (B, T, Hm), (B, T, S)


def build_attention(cfg: ModelConfig, query_size: int, memory_size: int) -> Attention:
    score = ATTENTIONS.get(cfg.attention)(query_size, memory_size, cfg)
    window = WINDOWS.get(cfg.window)(query_size, cfg)
    return Attention(score, window, cfg.renormalize_window)
