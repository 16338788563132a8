"""align: attention -> word links; AER; the reverse task's alignment is recovered."""

import numpy as np

from conftest import reverse_pairs
from nmtkit.align import aer, align_lines, parse_links, word_links
from nmtkit.checkpoint import LoadedModel


def test_word_links_merge_subwords():
    # source words: [0, 0, 1] (two pieces, then one); target words: [0, 1, 1] + EOS row
    attn = np.array([[0.2, 0.2, 0.6],
                     [0.5, 0.4, 0.1],
                     [0.1, 0.1, 0.8],
                     [0.3, 0.3, 0.4]])
    links = word_links(attn, [0, 0, 1], 2, [0, 1, 1], 2)
    # target 0: word sums (0.4, 0.6) -> 1; target 1: mean of rows 1, 2 = (0.55, 0.45) -> 0
    assert links == [(0, 1), (1, 0)]


def test_aer_and_parse():
    sure, possible = parse_links("1-1 2p2 3-4", one_based=True)
    assert sure == {(0, 0), (2, 3)} and possible == {(0, 0), (1, 1), (2, 3)}
    assert aer([{(0, 0), (1, 1), (2, 3)}], [sure], [possible]) == 0.0
    # A = {(0,0), (5,5)}: |A∩S| = 1, |A∩P| = 1 -> 1 - 2/(2+2)
    assert aer([{(0, 0), (5, 5)}], [sure], [possible]) == 0.5
    assert parse_links("2-1", reverse=True)[0] == {(1, 2)}


def test_reverse_task_alignment_recovered(trained_reverse):
    loaded = LoadedModel(trained_reverse / "best.pt")
    pairs = reverse_pairs(100, seed=21)
    out = list(align_lines(loaded, [s for s, _ in pairs] + [""], [t for _, t in pairs] + ["V1"]))
    assert len(out) == 101 and out[-1] == ""
    correct = total = 0
    for line, (src, _) in zip(out, pairs):
        n = len(src.split())
        links = {tuple(map(int, x.split("-"))) for x in line.split()}
        assert len(links) == n  # one link per target word
        correct += sum((n - 1 - j, j) in links for j in range(n))
        total += n
    assert correct / total >= 0.9
