"""Greedy and beam search over ``model.step``, batched over sentences (and beams).

Finished sentences leave the batch (their state rows are dropped with index_select); beam
search keeps all sentences x beams in one tensor and reorders the recurrent state with
index_select; no per-hypothesis Python objects live in the inner loop.
"""

from __future__ import annotations

import math

import torch

from nmtkit.model import Seq2Seq
from nmtkit.tokenizer import BOS, EOS, PAD


def max_lengths(lengths: torch.Tensor, ratio: float, floor: int = 5) -> torch.Tensor:
    """Per-sentence output limit: ceil(ratio · source length) + floor, at least 1."""
    return (lengths.double() * ratio).ceil().long() + floor


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: torch.Tensor, lengths: torch.Tensor, max_lens: torch.Tensor,
                  min_len: int = 0) -> list[list[int]]:
    """src (B, S), lengths (B,), max_lens (B,) -> one token list per sentence (no EOS).

    ``min_len`` forbids EOS before that many tokens (benchmarks force equal output lengths).
    """
    B = src.size(0)
    state = model.encode(src, lengths)
    out = torch.full((B, int(max_lens.max())), PAD, dtype=torch.long)
    alive = torch.arange(B)  # original row of each live sentence
    y = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    limits = max_lens.clone()
    for t in range(1, out.size(1) + 1):
        logp, _, state = model.step(state, y, t)  # (N, V)
        if t <= min_len:
            logp[:, EOS] = -math.inf
        y = logp.argmax(dim=-1)  # (N,)
        out[alive, t - 1] = y.cpu()
        done = (y == EOS).cpu() | (t >= limits)
        if done.all():
            break
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            alive, limits, y = alive[keep], limits[keep], y[keep.to(y.device)]
            state = state.select(keep.to(y.device))
    return [_strip(row) for row in out.tolist()]


def _strip(tokens: list[int]) -> list[int]:
    """Tokens up to (without) the first EOS or padding."""
    for i, tok in enumerate(tokens):
        if tok in (EOS, PAD):
            return tokens[:i]
    return tokens


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, lengths: torch.Tensor, max_lens: torch.Tensor,
                beam: int = 5, length_penalty: float = 1.0, min_len: int = 0) -> list[list[int]]:
    """Batched beam search; hypotheses ranked by log p / length^length_penalty (length counts EOS).

    A sentence is done when ``beam`` hypotheses have ended (fairseq's rule) or it reaches its
    limit, where the live hypotheses are finalised as they stand.
    """
    device = src.device
    B, K = src.size(0), beam
    state = model.encode(src, lengths).select(torch.arange(B, device=device).repeat_interleave(K))
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # only one live hypothesis at the start
    history = torch.empty((B * K, 0), dtype=torch.long, device=device)
    y = torch.full((B * K,), BOS, dtype=torch.long, device=device)
    alive = list(range(B))  # original index of each live sentence
    limits = max_lens.tolist()
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    t = 0
    while alive:
        t += 1
        N = len(alive)
        logp, _, state = model.step(state, y, t)  # (N*K, V)
        if t <= min_len:
            logp[:, EOS] = -math.inf
        V = logp.size(-1)
        cand = (scores.view(N * K, 1) + logp).view(N, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (N, 2K)
        top_beam, top_tok = top_idx // V, top_idx % V
        is_eos = top_tok == EOS
        # ended hypotheses: EOS among the K best candidates
        for row, rank in (is_eos[:, :K] & (top_scores[:, :K] > -math.inf)).nonzero().tolist():
            hyp = history[row * K + top_beam[row, rank]].tolist()
            score = top_scores[row, rank].item() / (len(hyp) + 1) ** length_penalty
            finished[alive[row]].append((score, hyp))
        # the K best candidates that continue
        rank_key = is_eos.long() * (2 * K) + torch.arange(2 * K, device=device)
        pick = rank_key.argsort(dim=1)[:, :K]  # (N, K)
        scores = top_scores.gather(1, pick)
        beams = top_beam.gather(1, pick)
        tokens = top_tok.gather(1, pick)
        flat = (torch.arange(N, device=device).unsqueeze(1) * K + beams).view(-1)  # (N*K,)
        history = torch.cat([history.index_select(0, flat), tokens.view(-1, 1)], dim=1)
        state = state.reorder(flat)
        y = tokens.view(-1)
        keep = []
        for row, sent in enumerate(alive):
            if len(finished[sent]) >= K:
                continue
            if t >= limits[sent]:  # out of length: finalise the live hypotheses as they are
                for k in range(K):
                    if scores[row, k] > -math.inf:
                        hyp = history[row * K + k].tolist()
                        finished[sent].append((scores[row, k].item() / len(hyp) ** length_penalty, hyp))
                continue
            keep.append(row)
        if len(keep) < N:
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            flat_keep = (rows.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            state, history, y = state.select(flat_keep), history.index_select(0, flat_keep), y[flat_keep]
            scores = scores.index_select(0, rows)
            alive = [alive[r] for r in keep]
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
