"""Corpus metrics with sacreBLEU (BLEU, chrF, TER) and their signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF, TER

from nmtkit.errors import NmtkitError


@dataclass
class MetricResult:
    name: str
    score: float
    text: str  # sacrebleu's formatted line
    signature: str

    def to_dict(self) -> dict:
        return {"name": self.name, "score": round(self.score, 4), "text": self.text,
                "signature": self.signature}


def corpus_scores(hypotheses: list[str], references: list[list[str]],
                  metrics: tuple[str, ...] = ("bleu", "chrf", "ter")) -> list[MetricResult]:
    """Score detokenized hypotheses against one or more reference streams (each as long)."""
    for n, ref in enumerate(references, 1):
        if len(ref) != len(hypotheses):
            raise NmtkitError(f"reference {n} has {len(ref)} lines but the hypotheses have {len(hypotheses)}")
    classes = {"bleu": BLEU, "chrf": CHRF, "ter": TER}
    results = []
    for name in metrics:
        metric = classes[name]()
        score = metric.corpus_score(hypotheses, references)
        results.append(MetricResult(score.name, float(score.score), str(score), str(metric.get_signature())))
    return results


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacreBLEU defaults: cased, 13a tokenization) of detokenized text."""
    return float(BLEU().corpus_score(hypotheses, [references]).score)
