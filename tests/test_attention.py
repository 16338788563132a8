"""Attention: golden values for every score and window, and properties of every valid
(score x window x decoder) combination.

Golden tests recompute the weights from a direct transcription of the papers' equations (plain
loops over batch, target step and source position, the module's parameters read as matrices)
and compare with ``nmtkit.attention``:

- Luong et al. 2015 §3.1: a_t(s) = exp(score(h_t, h̄_s)) / Σ_s' exp(score(h_t, h̄_s'))
  with dot h_tᵀh̄_s, general h_tᵀW_a h̄_s, concat v_aᵀ tanh(W_a[h_t; h̄_s]); location
  a_t = softmax(W_a h_t).
- Bahdanau et al. 2015 App. A.1.2: e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j).
- Luong et al. 2015 §3.2: local-m p_t = t (clamped to S); local-p p_t = S·sigmoid(v_pᵀ tanh(W_p h_t)),
  window |s − p_t| ≤ D, a_t(s) = align(h_t, h̄_s)·exp(−(s − p_t)²/2σ²), σ = D/2,
  source positions s = 1..S (1-based, as documented in nmtkit/attention.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import nmtkit.model  # noqa: F401  (registers every component)
from nmtkit.attention import Attention, build_attention
from nmtkit.config import ModelConfig
from nmtkit.errors import UsageError
from nmtkit.model import Seq2Seq, build_model
from nmtkit.registry import ATTENTIONS, DECODERS, ENCODERS, WINDOWS, BRIDGES
from nmtkit.tokenizer import BOS, EOS, PAD

F64 = torch.float64
SCORES = [name for name in ATTENTIONS.names() if name != "none"]


# ----------------------------------------------------------------------------- references

def ref_score(name: str, att: Attention, q: torch.Tensor, m: torch.Tensor, s: int) -> float:
    """score(q, h̄_s) for one query vector q (Hq,) and memory m (S, Hm) at 0-based position s,
    transcribed from the papers with the module's parameters as plain matrices."""
    sc = att.score
    if name == "luong-dot":  # h_tᵀ h̄_s
        return float(q @ m[s])
    if name == "luong-general":  # h_tᵀ W_a h̄_s
        return float(q @ (sc.W_a.weight @ m[s]))
    if name == "luong-concat":  # v_aᵀ tanh(W_a [h_t; h̄_s]), W_a one matrix over the concatenation
        W_a = torch.cat([sc.W_q.weight, sc.W_k.weight], dim=1)  # (A, Hq + Hm)
        return float(sc.v_a.weight[0] @ torch.tanh(W_a @ torch.cat([q, m[s]])))
    if name == "bahdanau":  # v_aᵀ tanh(W_a s_{i-1} + U_a h_j)
        return float(sc.v_a.weight[0] @ torch.tanh(sc.W_q.weight @ q + sc.W_k.weight @ m[s]))
    if name == "luong-location":  # (W_a h_t)_s; positions W_a does not predict get nothing
        W_a = sc.W_a.weight  # (max_len, Hq)
        return float(W_a[s] @ q) if s < W_a.size(0) else -math.inf
    raise AssertionError(f"no reference for score '{name}': add one to this test")


def ref_window(name: str, att: Attention, q: torch.Tensor, t: int, n: int, D: int
               ) -> tuple[list[bool], list[float], float | None]:
    """(allowed, factor, p_t) over 1-based positions s = 1..n for 1-based target step t."""
    positions = range(1, n + 1)
    if name == "global":
        return [True] * n, [1.0] * n, None
    if name == "local-m":
        p = min(t, n)  # p_t = t, clamped to the source length
        return [abs(s - p) <= D for s in positions], [1.0] * n, float(p)
    if name == "local-p":
        w = att.window
        p = n * float(torch.sigmoid(w.v_p.weight[0] @ torch.tanh(w.W_p.weight @ q)))
        sigma = D / 2
        return ([abs(s - p) <= D for s in positions],
                [math.exp(-((s - p) ** 2) / (2 * sigma**2)) for s in positions], p)
    raise AssertionError(f"no reference for window '{name}': add one to this test")


@torch.no_grad()
def ref_weights(score: str, window: str, att: Attention, query: torch.Tensor, memory: torch.Tensor,
                lengths: list[int], D: int, renormalize: bool) -> torch.Tensor:
    """Expected weights (B, T, S) by loops: softmax of the score over the allowed positions only,
    times the window factor (local-p), optionally renormalised."""
    B, T, _ = query.shape
    S = memory.size(1)
    out = torch.zeros(B, T, S, dtype=F64)
    for b, t in itertools.product(range(B), range(T)):
        n = lengths[b]
        allowed, factor, _ = ref_window(window, att, query[b, t], t + 1, n, D)
        e = [ref_score(score, att, query[b, t], memory[b], s) for s in range(n)]
        live = [s for s in range(n) if allowed[s] and e[s] > -math.inf]
        top = max(e[s] for s in live)
        z = sum(math.exp(e[s] - top) for s in live)
        row = [math.exp(e[s] - top) / z * factor[s] if s in live else 0.0 for s in range(n)]
        if renormalize:
            total = sum(row)
            row = [x / total for x in row]
        out[b, t, :n] = torch.tensor(row, dtype=F64)
    return out


def make_attention(score: str, window: str, query_size: int, memory_size: int, D: int = 2,
                   renormalize: bool = False, max_source_len: int = 5) -> Attention:
    cfg = ModelConfig(attention=score, window=window, window_size=D, renormalize_window=renormalize,
                      hidden_size=6, max_source_len=max_source_len)
    att = build_attention(cfg, query_size, memory_size).to(F64)
    if window == "local-p":  # spread p_t over the whole sentence, windows at both edges included
        with torch.no_grad():
            att.window.v_p.weight.mul_(6.0)
    return att


def run_attention(att: Attention, query: torch.Tensor, memory: torch.Tensor, lengths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The module under test: context (B, T, Hm), weights (B, T, S)."""
    S = memory.size(1)
    lens = torch.tensor(lengths)
    mask = torch.arange(S).unsqueeze(0) < lens.unsqueeze(1)  # (B, S)
    steps = torch.arange(1, query.size(1) + 1)  # (T,) 1-based target positions
    return att(query, att.keys(memory), memory, mask, lens, steps)


# ----------------------------------------------------------------------------- golden values

WINDOW_VARIANTS = [(w, False) for w in WINDOWS.names()] + [("local-p", True)]


@pytest.mark.parametrize("window,renormalize", WINDOW_VARIANTS,
                         ids=[w + ("-renormalized" if r else "") for w, r in WINDOW_VARIANTS])
@pytest.mark.parametrize("score", SCORES)
def test_weights_match_paper_equations(score: str, window: str, renormalize: bool) -> None:
    """Every score x window against a loop transcription of Luong §3.1-3.2 / Bahdanau App. A.1.2."""
    torch.manual_seed(0)
    Hq = 5
    Hm = Hq if score == "luong-dot" else 7  # unequal sizes catch transposed matrices
    lengths = [6, 4, 3, 1]  # S = 6 > max_source_len = 5 exercises location's cut-off
    B, T, S, D = len(lengths), 8, max(lengths), 2  # T > S exercises local-m's clamp
    att = make_attention(score, window, Hq, Hm, D=D, renormalize=renormalize)
    query = torch.randn(B, T, Hq, dtype=F64)
    memory = torch.randn(B, S, Hm, dtype=F64)
    context, weights = run_attention(att, query, memory, lengths)

    expected = ref_weights(score, window, att, query, memory, lengths, D, renormalize)
    assert weights.dtype == F64 and weights.shape == (B, T, S)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    # c_t = Σ_s a_t(s) h̄_s
    expected_context = torch.stack([expected[b] @ memory[b] for b in range(B)])  # (B, T, Hm)
    torch.testing.assert_close(context, expected_context, atol=1e-6, rtol=0)
    if window != "global":  # the test inputs really exercise the window
        assert (expected[0] == 0).any(), "D too large: the window excludes nothing"


def test_local_p_by_hand() -> None:
    """Local-p (Luong §3.2) with literal numbers: W_p = 0, v_p = 0 give p_t = S·sigmoid(0) = S/2.
    S = 5 -> p_t = 2.5; D = 2 -> window {1, 2, 3, 4} (1-based; 0-based it would be {0..4});
    σ = 1; a zero query gives a uniform align of 1/4 over the window, so
    a_t(s) = 1/4 · exp(−(s − 2.5)²/2): [e^{-1.125}, e^{-0.125}, e^{-0.125}, e^{-1.125}, 0] / 4."""
    for renormalize, expected in (
        (False, [0.08116311683958743, 0.22062422564614886, 0.22062422564614886, 0.08116311683958743, 0.0]),
        (True, [0.13447071068499755, 0.36552928931500245, 0.36552928931500245, 0.13447071068499755, 0.0]),
    ):
        att = make_attention("luong-dot", "local-p", 3, 3, D=2, renormalize=renormalize)
        with torch.no_grad():
            att.window.W_p.weight.zero_()
            att.window.v_p.weight.zero_()
        query = torch.zeros(1, 1, 3, dtype=F64)
        memory = torch.randn(1, 5, 3, dtype=F64)
        _, weights = run_attention(att, query, memory, [5])
        torch.testing.assert_close(weights[0, 0], torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)


def test_local_m_by_hand() -> None:
    """Local-m with literal numbers: p_t = t clamped to S = 5, D = 2, uniform align (zero query).
    t = 1 -> {1, 2, 3}; t = 4 -> {2, 3, 4, 5}; t = 7 -> p_t = 5 -> {3, 4, 5}."""
    att = make_attention("luong-dot", "local-m", 3, 3, D=2)
    query = torch.zeros(1, 7, 3, dtype=F64)
    memory = torch.randn(1, 5, 3, dtype=F64)
    _, weights = run_attention(att, query, memory, [5])
    third, quarter = 1 / 3, 1 / 4
    expected = {0: [third, third, third, 0, 0], 3: [0, quarter, quarter, quarter, quarter],
                6: [0, 0, third, third, third]}
    for t, row in expected.items():
        torch.testing.assert_close(weights[0, t], torch.tensor(row, dtype=F64), atol=1e-12, rtol=0)


def test_location_ignores_memory_contents() -> None:
    """Location attention depends only on h_t (Luong §3.1, location): other memory, same weights."""
    att = make_attention("luong-location", "global", 4, 6, max_source_len=10)
    query = torch.randn(2, 3, 4, dtype=F64)
    _, w1 = run_attention(att, query, torch.randn(2, 5, 6, dtype=F64), [5, 3])
    _, w2 = run_attention(att, query, torch.randn(2, 5, 6, dtype=F64), [5, 3])
    torch.testing.assert_close(w1, w2, atol=0, rtol=0)


# ----------------------------------------------------------------------------- combinations

def _combo_config(decoder: str, attention: str, window: str, renormalize: bool = False, **extra) -> ModelConfig:
    """A tiny model of one combination (fp64-friendly sizes; dropout 0)."""
    values = dict(encoder="birnn", decoder=decoder, attention=attention, window=window, window_size=1,
                  renormalize_window=renormalize, rnn="gru" if decoder != "luong" else "lstm", layers=2,
                  hidden_size=8, embed_size=6, dropout=0.0, src_vocab_size=11, tgt_vocab_size=13,
                  max_source_len=9 if attention == "luong-location" else 0)
    values.update(extra)
    return ModelConfig(**values)


def _is_valid(cfg: ModelConfig) -> bool:
    try:
        cfg.validate()
    except UsageError:
        return False
    return True


ALL_COMBOS = list(itertools.product(DECODERS.names(), ATTENTIONS.names(), WINDOWS.names()))
VALID = [c for c in ALL_COMBOS if _is_valid(_combo_config(*c))]
REJECTED = [c for c in ALL_COMBOS if c not in VALID]
# every valid combination, plus local-p renormalised where local-p is valid
VARIANTS = [(*c, False) for c in VALID] + [(*c, True) for c in VALID if c[2] == "local-p"]


def _variant_id(v: tuple) -> str:
    return "-".join(v[:3]) + ("-renormalized" if v[3] else "")


def test_combination_lists_are_complete() -> None:
    """The registries are enumerated, so every new name is covered; the expected counts of
    nmtkit today (a change here means the docs' table needs updating too)."""
    assert len(VALID) + len(REJECTED) == len(DECODERS.names()) * len(ATTENTIONS.names()) * len(WINDOWS.names())
    assert ("none", "none", "global") in VALID
    assert all(d != "none" and a != "none" for d, a, _ in VALID if (d, a) != ("none", "none"))
    assert {(d, a) for d, a, _ in VALID if d != "none"} == set(itertools.product(["luong", "bahdanau"], SCORES))


@pytest.mark.parametrize("decoder,attention,window", REJECTED, ids=["-".join(c) for c in REJECTED])
def test_rejected_combinations_raise_usage_error(decoder: str, attention: str, window: str) -> None:
    """Ill-defined combinations fail in validate() with one line that names what is wrong."""
    cfg = _combo_config(decoder, attention, window)
    with pytest.raises(UsageError) as info:
        cfg.validate()
    message = str(info.value)
    assert "\n" not in message
    if (decoder == "none") != (attention == "none"):
        assert "decoder 'none'" in message and "attention 'none'" in message
    else:
        assert f"window '{window}'" in message
    with pytest.raises(UsageError):
        build_model(cfg)


def _batch(lengths: list[int], tgt_lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random padded batch: src (B, S), lengths (B,), tgt_in (B, T), tgt_out (B, T)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = len(lengths), max(lengths), max(tgt_lengths) + 1
    src = torch.full((B, S), PAD)
    tgt_in = torch.full((B, T), PAD)
    tgt_out = torch.full((B, T), PAD)
    for b, (n, m) in enumerate(zip(lengths, tgt_lengths)):
        src[b, :n] = torch.randint(4, 11, (n,), generator=g)
        words = torch.randint(4, 13, (m,), generator=g)
        tgt_in[b, : m + 1] = torch.cat([torch.tensor([BOS]), words])
        tgt_out[b, : m + 1] = torch.cat([words, torch.tensor([EOS])])
    return src, torch.tensor(lengths), tgt_in, tgt_out


def _model(cfg: ModelConfig, seed: int = 0) -> Seq2Seq:
    torch.manual_seed(seed)
    model = build_model(cfg).to(F64)
    if cfg.window == "local-p":  # spread p_t so that windows land on different positions
        with torch.no_grad():
            model.decoder.attention.window.v_p.weight.mul_(6.0)
    return model


LENGTHS, TGT_LENGTHS = [7, 4, 2, 1], [5, 8, 3, 2]


@pytest.mark.parametrize("decoder,attention,window,renormalize", VARIANTS, ids=[_variant_id(v) for v in VARIANTS])
def test_weights_are_distributions_on_allowed_positions(decoder: str, attention: str, window: str,
                                                        renormalize: bool) -> None:
    """Inside a full model: a_t sums to 1 over the allowed positions (local-p without
    renormalisation: a_t = align·gaussian with Σ align = 1 over the window), and is exactly 0 on
    padding and outside the window |s − p_t| ≤ D."""
    cfg = _combo_config(decoder, attention, window, renormalize)
    model = _model(cfg).eval()
    queries: list[torch.Tensor] = []
    if window == "local-p":  # the query each step passes to the window, to recompute p_t here
        model.decoder.attention.window.register_forward_hook(lambda mod, args, out: queries.append(args[0]))
    src, lengths, tgt_in, _ = _batch(LENGTHS, TGT_LENGTHS)
    with torch.no_grad():
        _, attn = model(src, lengths, tgt_in)
    if decoder == "none":
        assert attn is None and model.decoder.attention is None
        return
    B, T, S = attn.shape
    assert (B, T, S) == (len(LENGTHS), tgt_in.size(1), max(LENGTHS))
    D = cfg.window_size
    s = torch.arange(1, S + 1, dtype=F64)  # 1-based positions
    query = torch.cat(queries, dim=1) if queries else None  # (B, T, H)
    for b in range(B):
        n = LENGTHS[b]
        a = attn[b]  # (T, S)
        assert (a[:, n:] == 0).all(), "weight on padding"
        if window == "global":
            allowed = (s <= n).expand(T, S)
            gauss = torch.ones(T, S, dtype=F64)
        elif window == "local-m":
            p = torch.arange(1, T + 1, dtype=F64).clamp(max=n).unsqueeze(1)  # (T, 1)
            allowed = ((s - p).abs() <= D) & (s <= n)
            gauss = torch.ones(T, S, dtype=F64)
        else:
            w = model.decoder.attention.window
            p = n * torch.sigmoid(torch.tanh(query[b] @ w.W_p.weight.T) @ w.v_p.weight.T)  # (T, 1)
            allowed = ((s - p).abs() <= D) & (s <= n)
            gauss = torch.exp(-((s - p) ** 2) / (2 * (D / 2) ** 2))
        assert allowed.any(dim=1).all()
        assert (a[~allowed] == 0).all(), "weight outside the window"
        assert (a[allowed] > 0).all()
        if window == "local-p" and not renormalize:
            align = torch.where(allowed, a / gauss, torch.zeros_like(a))
            torch.testing.assert_close(align.sum(1), torch.ones(T, dtype=F64), atol=1e-9, rtol=0)
            assert (a.sum(1) < 1).all(), "Luong's local-p is not renormalised"
        else:
            torch.testing.assert_close(a.sum(1), torch.ones(T, dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("decoder,attention,window,renormalize", VARIANTS, ids=[_variant_id(v) for v in VARIANTS])
def test_padded_batch_equals_sentences_alone(decoder: str, attention: str, window: str, renormalize: bool) -> None:
    """Padding changes nothing: each sentence's logits in a padded batch equal its logits alone."""
    model = _model(_combo_config(decoder, attention, window, renormalize)).eval()
    src, lengths, tgt_in, _ = _batch(LENGTHS, TGT_LENGTHS)
    with torch.no_grad():
        logits, attn = model(src, lengths, tgt_in)
        for b, (n, m) in enumerate(zip(LENGTHS, TGT_LENGTHS)):
            alone, attn_alone = model(src[b:b + 1, :n], lengths[b:b + 1], tgt_in[b:b + 1, : m + 1])
            torch.testing.assert_close(logits[b, : m + 1], alone[0], atol=1e-10, rtol=0)
            if attn is not None:
                torch.testing.assert_close(attn[b, : m + 1, :n], attn_alone[0], atol=1e-10, rtol=0)


def _assert_every_parameter_learns(model: Seq2Seq, seed: int = 0) -> None:
    model.train()
    src, lengths, tgt_in, tgt_out = _batch(LENGTHS, TGT_LENGTHS, seed)
    loss, _ = model(src, lengths, tgt_in, tgt_out)
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("decoder,attention,window,renormalize", VARIANTS, ids=[_variant_id(v) for v in VARIANTS])
def test_gradients_reach_every_parameter(decoder: str, attention: str, window: str, renormalize: bool) -> None:
    """One backward on a random batch gives every parameter a non-zero gradient."""
    _assert_every_parameter_learns(_model(_combo_config(decoder, attention, window, renormalize)))


ARCHITECTURES = [
    (dec, enc, rnn, bridge, rev)
    for dec, enc, rnn, bridge, rev in itertools.product(
        DECODERS.names(), ENCODERS.names(), ["lstm", "gru"], ["auto", *BRIDGES.names()], [False, True])
    if _is_valid(_combo_config(dec, "none" if dec == "none" else "luong-general", "global", encoder=enc,
                               rnn=rnn, bridge=bridge, reverse_source=rev))
]


@pytest.mark.parametrize("decoder,encoder,rnn,bridge,reverse", ARCHITECTURES,
                         ids=[f"{d}-{e}-{r}-{b}" + ("-reverse" if v else "") for d, e, r, b, v in ARCHITECTURES])
def test_encoders_and_bridges(decoder: str, encoder: str, rnn: str, bridge: str, reverse: bool) -> None:
    """Every encoder x rnn x bridge x reversal: padding-invariant and every parameter learns."""
    cfg = _combo_config(decoder, "none" if decoder == "none" else "luong-general", "global", encoder=encoder,
                        rnn=rnn, bridge=bridge, reverse_source=reverse)
    model = _model(cfg).eval()
    src, lengths, tgt_in, _ = _batch(LENGTHS, TGT_LENGTHS, seed=1)
    with torch.no_grad():
        logits, _ = model(src, lengths, tgt_in)
        for b, (n, m) in enumerate(zip(LENGTHS, TGT_LENGTHS)):
            alone, _ = model(src[b:b + 1, :n], lengths[b:b + 1], tgt_in[b:b + 1, : m + 1])
            torch.testing.assert_close(logits[b, : m + 1], alone[0], atol=1e-10, rtol=0)
    _assert_every_parameter_learns(model, seed=1)


@pytest.mark.parametrize("field,value,decoder,window,named", [
    ("renormalize_window", True, "luong", "global", "window 'global'"),
    ("renormalize_window", True, "bahdanau", "local-m", "window 'local-m'"),
    ("input_feed", False, "bahdanau", "global", "decoder 'bahdanau'"),
], ids=["renormalize-global", "renormalize-local-m", "no-input-feed-bahdanau"])
def test_options_that_would_be_ignored_are_rejected(field: str, value: bool, decoder: str, window: str,
                                                    named: str) -> None:
    """An option that has no effect on the chosen components is an error, not silently ignored."""
    cfg = _combo_config(decoder, "luong-general", window, **{field: value})
    with pytest.raises(UsageError, match=named):
        cfg.validate()
    _combo_config("luong", "luong-general", "local-p", renormalize_window=True, input_feed=False).validate()
