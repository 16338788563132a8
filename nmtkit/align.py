"""Attention -> word alignments (Pharaoh ``i-j``, 0-based, source-target) by forced decoding,
and alignment error rate against gold links (Och & Ney 2003).

Subword attention is mapped to words: a target word's row is the mean of its subwords' rows,
each source word's column the sum over its subwords; a target word links to its argmax source word.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from nmtkit.checkpoint import LoadedModel
from nmtkit.data import pad
from nmtkit.errors import NmtkitError
from nmtkit.tokenizer import BOS


@torch.no_grad()
def forced_attention(loaded: LoadedModel, sources: list[list[int]], targets: list[list[int]],
                     batch_size: int = 32) -> list[np.ndarray]:
    """Attention weights (len(target) + 1, len(source)) per pair; the last row is the EOS step."""
    model = loaded.model
    if model.decoder.attention is None:
        raise NmtkitError(f"{loaded.path}: decoder '{loaded.config.model.decoder}' has no attention to align")
    results: list[np.ndarray] = [np.zeros((len(t) + 1, len(s))) for s, t in zip(sources, targets)]
    order = [i for i in sorted(range(len(sources)), key=lambda i: -len(sources[i])) if sources[i]]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        src = pad([sources[i] for i in rows])
        lengths = torch.tensor([len(sources[i]) for i in rows])
        tgt_in = pad([[BOS] + targets[i] for i in rows])
        _, attn = model(src, lengths, tgt_in)  # (B, T, S)
        for row, i in enumerate(rows):
            results[i] = attn[row, : len(targets[i]) + 1, : len(sources[i])].float().numpy()
    return results


def word_links(attn: np.ndarray, src_words: list[int], n_src: int, tgt_words: list[int], n_tgt: int
               ) -> list[tuple[int, int]]:
    """Subword attention (T+1, S) -> one (source word, target word) link per target word."""
    if n_src == 0 or n_tgt == 0:
        return []
    by_src = np.zeros((attn.shape[0], n_src))
    np.add.at(by_src.T, np.asarray(src_words), attn.T)  # sum subword columns per source word
    words = np.zeros((n_tgt, n_src))
    counts = np.zeros(n_tgt)
    np.add.at(words, np.asarray(tgt_words), by_src[: len(tgt_words)])
    np.add.at(counts, np.asarray(tgt_words), 1)
    words /= np.maximum(counts, 1)[:, None]
    return sorted((int(words[j].argmax()), j) for j in range(n_tgt) if counts[j])


def align_lines(loaded: LoadedModel, src_lines: list[str], tgt_lines: list[str], batch_size: int = 32
                ) -> Iterator[str]:
    """One Pharaoh line per sentence pair (empty when either side is empty)."""
    src_maps = [loaded.src_tok.word_of_piece(line) for line in src_lines]
    tgt_maps = [loaded.tgt_tok.word_of_piece(line) for line in tgt_lines]
    sources = [loaded.src_tok.encode(line) for line in src_lines]
    targets = [loaded.tgt_tok.encode(line) for line in tgt_lines]
    attns = forced_attention(loaded, sources, targets, batch_size)
    for attn, (sw, ns), (tw, nt), s, t in zip(attns, src_maps, tgt_maps, sources, targets):
        links = word_links(attn, sw, ns, tw, nt) if s and t else []
        yield " ".join(f"{i}-{j}" for i, j in links)


def parse_links(line: str, one_based: bool = False, reverse: bool = False) -> tuple[set, set]:
    """'i-j' (sure) and 'ipj' (possible) links -> (sure, possible ⊇ sure) as 0-based (src, tgt)."""
    sure, possible = set(), set()
    for item in line.split():
        is_possible = "p" in item
        a, b = item.replace("p", "-").split("-")
        link = (int(a) - one_based, int(b) - one_based)
        if reverse:
            link = link[::-1]
        possible.add(link)
        if not is_possible:
            sure.add(link)
    return sure, possible


def aer(hypotheses: Iterable[set], sure: Iterable[set], possible: Iterable[set]) -> float:
    """AER = 1 − (|A∩S| + |A∩P|) / (|A| + |S|), summed over the corpus (Och & Ney 2003)."""
    a_s = a_p = n_a = n_s = 0
    for A, S, P in zip(hypotheses, sure, possible):
        a_s, a_p, n_a, n_s = a_s + len(A & S), a_p + len(A & P), n_a + len(A), n_s + len(S)
    return 1.0 - (a_s + a_p) / max(n_a + n_s, 1)
