"""Greedy and beam search over ``model.step``, batched over sentences (and beams).

Finished sentences leave the batch (their state rows are dropped with index_select); beam
search keeps all sentences x beams in one tensor and reorders the recurrent state with
index_select, while each sentence's memory is held once and queried by all its beams together;
no per-hypothesis Python objects live in the inner loop.
"""

from __future__ import annotations

import math

import torch

from nmtkit.kernels import topk_rows
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
    The argmax is taken over the logits (``Seq2Seq.greedy_step``).
    """
    B = src.size(0)
    state = model.encode(src, lengths)
    steps = int(max_lens.max())
    tokens: list[torch.Tensor] = []  # per step: (N,) tokens of the live sentences
    rows: list[torch.Tensor] = []  # per step: their original rows
    alive = torch.arange(B)  # original row of each live sentence
    y = torch.full((B,), BOS, dtype=torch.long, device=src.device)
    limits = max_lens.clone()
    for t in range(1, steps + 1):
        y, state = model.greedy_step(state, y, t, banned=EOS if t <= min_len else None)  # (N,)
        y_cpu = y.cpu()
        tokens.append(y_cpu)
        rows.append(alive)
        done = (y_cpu == EOS) | (t >= limits)
        if bool(done.any()):
            if bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)
            alive, limits = alive[keep], limits[keep]
            keep = keep.to(y.device)
            y = y.index_select(0, keep)
            state = state.select(keep)
    out = torch.full((B, steps), PAD, dtype=torch.long)
    for t, (tok, row) in enumerate(zip(tokens, rows)):
        out[row, t] = tok
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
    limit, where the live hypotheses are finalised as they stand. Per step the only Python loop
    is over the hypotheses that end at that step (at most beam x sentences over the whole search).
    """
    device = src.device
    B, K = src.size(0), beam
    state = model.encode(src, lengths).with_beam(K)  # hypotheses b·K … b·K+K−1 share sentence b's memory
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # only one live hypothesis at the start
    history = torch.empty((B * K, 0), dtype=torch.long, device=device)
    y = torch.full((B * K,), BOS, dtype=torch.long, device=device)
    alive = torch.arange(B)  # original index of each live sentence
    limits = max_lens.clone().cpu()
    n_finished = torch.zeros(B, dtype=torch.long)  # per live sentence
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    offsets = torch.arange(2 * K, device=device)
    t = 0
    while len(alive):
        t += 1
        N = len(alive)
        logp, _, state = model.step(state, y, t)  # (N*K, V)
        if t <= min_len:
            logp[:, EOS] = -math.inf
        # The 2K best of the K·V candidates score + log p come from the 2K best tokens of each
        # beam: a per-row top-2K, then the top 2K of N·K·2K sums (not a sum over all K·V).
        per = min(2 * K, logp.size(1))  # a beam's best tokens (all of them when V < 2K)
        best, best_tok = topk_rows(logp, per)  # (N*K, per): logp.topk(per, dim=1)
        cand = (scores.view(N * K, 1) + best).view(N, K * per)
        top_scores, top_pos = cand.topk(min(2 * K, K * per), dim=1)  # (N, 2K)
        top_beam = top_pos // per
        top_tok = best_tok.view(N, K * per).gather(1, top_pos)
        is_eos = top_tok == EOS
        # ended hypotheses: EOS among the K best candidates
        ended = is_eos[:, :K] & (top_scores[:, :K] > -math.inf)
        if bool(ended.any()):
            ended_rows, ended_ranks = ended.nonzero(as_tuple=True)
            sources = ended_rows * K + top_beam[ended_rows, ended_ranks]
            hyps = history.index_select(0, sources).tolist()
            for row, score, hyp in zip(ended_rows.tolist(), top_scores[ended_rows, ended_ranks].tolist(), hyps):
                finished[int(alive[row])].append((score / (len(hyp) + 1) ** length_penalty, hyp))
            n_finished += ended.sum(1).cpu()
        # the K best candidates that continue
        rank_key = is_eos.long() * (2 * K) + offsets[: is_eos.size(1)]
        pick = rank_key.argsort(dim=1)[:, :K]  # (N, K)
        scores = top_scores.gather(1, pick)
        beams = top_beam.gather(1, pick)
        tokens = top_tok.gather(1, pick)
        flat = (torch.arange(N, device=device).unsqueeze(1) * K + beams).view(-1)  # (N*K,)
        history = torch.cat([history.index_select(0, flat), tokens.view(-1, 1)], dim=1)
        state = state.reorder(flat)
        y = tokens.view(-1)
        complete = n_finished >= K
        out_of_length = ~complete & (t >= limits)
        if bool(out_of_length.any()):  # finalise the live hypotheses as they are
            rows_ = out_of_length.nonzero().squeeze(1)
            live = scores.index_select(0, rows_.to(device)).cpu()  # (R, K)
            hyps = history.view(N, K, -1).index_select(0, rows_.to(device)).tolist()
            for r, row in enumerate(rows_.tolist()):
                for k in range(K):
                    if live[r, k] > -math.inf:
                        hyp = hyps[r][k]
                        finished[int(alive[row])].append((float(live[r, k]) / len(hyp) ** length_penalty, hyp))
        leaving = complete | out_of_length
        if bool(leaving.any()):
            keep = (~leaving).nonzero().squeeze(1)
            keep_dev = keep.to(device)
            flat_keep = (keep_dev.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            state, history, y = state.select(flat_keep, keep_dev), history.index_select(0, flat_keep), y[flat_keep]
            scores = scores.index_select(0, keep_dev)
            alive, limits, n_finished = alive[keep], limits[keep], n_finished[keep]
    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
