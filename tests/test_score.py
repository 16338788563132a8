"""score: sacreBLEU metrics with signatures, several references, length checks."""

import pytest
from sacrebleu.metrics import BLEU, CHRF

from nmtkit.errors import NmtkitError
from nmtkit.score import bleu, corpus_scores

HYPS = ["The cat sat on the mat.", "A dog runs in the park today."]
REFS = ["The cat sat on a mat.", "A dog is running in the park."]
REFS2 = ["The cat was sitting on the mat.", "A dog runs in the park today."]


def test_matches_sacrebleu():
    results = {r.name: r for r in corpus_scores(HYPS, [REFS])}
    assert results["BLEU"].score == pytest.approx(BLEU().corpus_score(HYPS, [REFS]).score)
    assert results["chrF2"].score == pytest.approx(CHRF().corpus_score(HYPS, [REFS]).score)
    assert "TER" in results
    assert "nrefs:1" in results["BLEU"].signature and "case:mixed" in results["BLEU"].signature
    assert bleu(HYPS, REFS) == pytest.approx(results["BLEU"].score)


def test_several_references_raise_the_score():
    one = corpus_scores(HYPS, [REFS], ("bleu",))[0]
    two = corpus_scores(HYPS, [REFS, REFS2], ("bleu",))[0]
    assert two.score > one.score and "nrefs:2" in two.signature


def test_line_count_mismatch():
    with pytest.raises(NmtkitError, match="reference 1 has 1 lines"):
        corpus_scores(HYPS, [REFS[:1]])
