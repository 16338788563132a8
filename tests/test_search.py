"""Greedy and beam search: batch-invariant, beam 1 == greedy, beam search is exact when exhaustive."""

import itertools
import math

import pytest
import torch

from nmtkit.config import ModelConfig
from nmtkit.data import pad
from nmtkit.model import build_model
from nmtkit.search import beam_search, greedy_search, max_lengths
from nmtkit.tokenizer import BOS, EOS


def tiny_model(vocab: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=16, embed_size=8, layers=1, dropout=0.0, src_vocab_size=vocab,
                      tgt_vocab_size=vocab)
    model = build_model(cfg).eval()
    with torch.no_grad():  # make EOS rare so hypotheses run to different lengths
        model.generator.bias[EOS] -= 1.0
    return model


SOURCES = [[5, 6, 7, 8, 9], [4, 5], [9, 8, 7], [6, 6, 6, 6, 6, 6, 6], [4]]


def run(search, model, sources, **kw):
    src = pad(sources)
    lengths = torch.tensor([len(s) for s in sources])
    return search(model, src, lengths, max_lengths(lengths, 1.5), **kw)


@pytest.mark.parametrize("search, kw", [(greedy_search, {}), (beam_search, {"beam": 3})])
def test_batch_gives_same_outputs_as_one_by_one(search, kw):
    model = tiny_model()
    together = run(search, model, SOURCES, **kw)
    alone = [run(search, model, [s], **kw)[0] for s in SOURCES]
    assert together == alone
    assert all(EOS not in out for out in together)


def test_beam_one_equals_greedy():
    model = tiny_model()
    assert run(beam_search, model, SOURCES, beam=1) == run(greedy_search, model, SOURCES)


def test_respects_max_length_and_min_length():
    model = tiny_model()
    src, lengths = pad([[5, 6]]), torch.tensor([2])
    out = greedy_search(model, src, lengths, torch.tensor([4]), min_len=4)
    assert len(out[0]) == 4  # EOS forbidden for 4 steps, then the limit stops it


@torch.no_grad()
def sequence_log_prob(model, src, tokens, end_with_eos: bool) -> float:
    state = model.encode(src, torch.tensor([src.size(1)]))
    y, total = torch.tensor([BOS]), 0.0
    for t, tok in enumerate(tokens + ([EOS] if end_with_eos else []), 1):
        logp, _, state = model.step(state, y, t)
        total += float(logp[0, tok])
        y = torch.tensor([tok])
    return total


def test_exhaustive_beam_finds_the_best_sequence():
    """With a beam as wide as all prefixes, beam search must return the argmax of
    log p(y) / |y|^α over every sequence it could produce (α = 1, length counts EOS)."""
    vocab, limit = 5, 3
    model = tiny_model(vocab=vocab, seed=3)
    src = torch.tensor([[4, 4, 4]])
    best = beam_search(model, src, torch.tensor([3]), torch.tensor([limit]), beam=vocab ** limit)[0]
    candidates = []
    for n in range(0, limit + 1):
        for seq in itertools.product([t for t in range(vocab) if t != EOS], repeat=n):
            seq = list(seq)
            if n < limit:  # ended by EOS within the limit
                candidates.append((sequence_log_prob(model, src, seq, True) / (n + 1), seq))
            else:  # cut at the limit without EOS
                candidates.append((sequence_log_prob(model, src, seq, False) / n, seq))
    expected = max(candidates)
    assert best == expected[1]
    assert math.isfinite(expected[0])


@pytest.mark.parametrize("prepared", [False, True])
def test_search_step_log_probs_are_log_softmax_of_the_logits(prepared):
    """``Seq2Seq.step`` turns its logits into log p in place during search: the same numbers
    as F.log_softmax bit for bit (packed fp32 generator too); with gradients it stays differentiable."""
    from nmtkit.translate import prepare_for_inference

    model = tiny_model()
    if prepared:
        prepare_for_inference(model)
    src = pad(SOURCES)
    lengths = torch.tensor([len(s) for s in SOURCES])
    y = torch.full((len(SOURCES),), BOS)
    with torch.inference_mode():
        state = model.encode(src, lengths)
        logp, _, _ = model.step(state, y, 1)
        out, _, _ = model.decoder.step_tokens(state, y, 1)
        want = torch.nn.functional.log_softmax(model.generator(out).float(), dim=-1)
    assert torch.equal(logp, want)
    assert torch.allclose(logp.exp().sum(1), torch.ones(len(SOURCES)))
    if not prepared:
        model.train()
        logp, _, _ = model.step(model.encode(src, lengths), y, 1)
        logp[:, EOS].sum().backward()
        assert model.generator.weight.grad is not None and model.generator.weight.grad.abs().sum() > 0
