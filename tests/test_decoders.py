"""Decoder and encoder equations, one step at a time, against hand computations.

- Bahdanau et al. 2015, App. A.2.2 (RNNsearch): the attention query is the PREVIOUS state
  s_{i-1}; c_i = Σ_j α_ij h_j; s_i = GRU(s_{i-1}, [E y_{i-1}; c_i]);
  t̃_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i, t_i = maxout_pool2(t̃_i), p(y_i) = softmax(W_o t_i);
  s_0 = tanh(W_s ←h_1).
- Luong et al. 2015 §3: h_t = LSTM(h_{t-1}, [E y_{t-1}; h̃_{t-1}]) (input feeding, §3.3), the query
  is the CURRENT top state h_t, h̃_t = tanh(W_c [c_t; h_t]) (eq. 5), p(y_t) = softmax(W_s h̃_t) (eq. 6).
- Encoders return their states in source order, also with --reverse-source.

The recurrent cells are checked against torch.nn.GRUCell / LSTMCell built from the decoder's
weights (nmtkit documents that its cells follow them; note torch's GRU applies the reset gate
after the recurrent matrix, r ⊙ (U h), where Bahdanau's App. A writes U (r ⊙ h)).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import nmtkit.model  # noqa: F401
from nmtkit.config import ModelConfig
from nmtkit.decoders import DecoderState
from nmtkit.model import Seq2Seq, build_model
from nmtkit.tokenizer import BOS, PAD

F64 = torch.float64
LENGTHS = [6, 3, 1]


def make_model(**overrides) -> Seq2Seq:
    """A small fp64 model in eval mode (dropout 0), deterministic weights."""
    values = dict(encoder="birnn", decoder="bahdanau", attention="bahdanau", window="global", rnn="gru",
                  layers=1, hidden_size=8, embed_size=5, dropout=0.0, src_vocab_size=12, tgt_vocab_size=14,
                  maxout_size=3)
    values.update(overrides)
    if values["decoder"] == "luong":
        values["maxout_size"] = 0
    torch.manual_seed(0)
    return build_model(ModelConfig(**values)).to(F64).eval()


def make_source(lengths: list[int] = LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """src (B, S) right-padded, lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(4, 12, (n,), generator=g)
    return src, torch.tensor(lengths)


def masked_softmax(e: torch.Tensor, n: int) -> torch.Tensor:
    """softmax of scores e (S,) over the first n positions; 0 on padding."""
    out = torch.zeros_like(e)
    out[:n] = torch.softmax(e[:n], dim=0)
    return out


def additive_weights(model: Seq2Seq, query: torch.Tensor, state: DecoderState) -> torch.Tensor:
    """α_ij = softmax_j(v_aᵀ tanh(W_a q_i + U_a h_j)) by a loop over j; query (B, H) -> (B, S)."""
    score = model.decoder.attention.score
    W_a, U_a, v_a = score.W_q.weight, score.W_k.weight, score.v_a.weight[0]
    B, S, _ = state.memory.shape
    rows = []
    for b in range(B):
        e = torch.stack([v_a @ torch.tanh(W_a @ query[b] + U_a @ state.memory[b, j]) for j in range(S)])
        rows.append(masked_softmax(e, int(state.lengths[b])))
    return torch.stack(rows)


def general_weights(model: Seq2Seq, query: torch.Tensor, state: DecoderState) -> torch.Tensor:
    """a_t(s) = softmax_s(h_tᵀ W_a h̄_s) by a loop over s; query (B, H) -> (B, S)."""
    W_a = model.decoder.attention.score.W_a.weight
    B, S, _ = state.memory.shape
    rows = []
    for b in range(B):
        e = torch.stack([query[b] @ (W_a @ state.memory[b, s]) for s in range(S)])
        rows.append(masked_softmax(e, int(state.lengths[b])))
    return torch.stack(rows)


def maxout_pool2(x: torch.Tensor) -> torch.Tensor:
    """t_i = [max(t̃_{i,2k-1}, t̃_{i,2k})]_k (Bahdanau App. A.2.2) by a loop; x (B, 2l) -> (B, l)."""
    return torch.stack([torch.maximum(x[:, 2 * k], x[:, 2 * k + 1]) for k in range(x.size(1) // 2)], dim=1)


def cell_like(decoder, kind: str):
    """torch.nn.GRUCell / LSTMCell with the decoder's first-layer weights (input [E y; extra])."""
    rnn = decoder.rnn
    w_ih = rnn.embed_proj.weight if rnn.extra_proj is None else torch.cat([rnn.embed_proj.weight, rnn.extra_proj.weight], 1)
    cls = torch.nn.GRUCell if kind == "gru" else torch.nn.LSTMCell
    cell = cls(w_ih.size(1), decoder.hidden_size).to(F64)
    with torch.no_grad():
        cell.weight_ih.copy_(w_ih)
        cell.bias_ih.copy_(rnn.embed_proj.bias)
        cell.weight_hh.copy_(rnn.hidden_proj[0].weight)
        cell.bias_hh.copy_(rnn.hidden_proj[0].bias)
    return cell


# ----------------------------------------------------------------------------- Bahdanau (RNNsearch)

@torch.no_grad()
def test_bahdanau_step_equations() -> None:
    """Three RNNsearch steps: α_i from s_{i-1} (not s_i), c_i, the deep maxout output t_i,
    p(y_i) = softmax(W_o t_i) and s_i = GRU(s_{i-1}, [E y_{i-1}; c_i])."""
    model = make_model()
    dec = model.decoder
    src, lengths = make_source()
    state = model.encode(src, lengths)
    cell = cell_like(dec, "gru")
    y_prev = torch.full((len(LENGTHS),), BOS)
    for i in (1, 2, 3):
        s_prev = state.hidden["h"][:, -1]  # s_{i-1} (B, H)
        logp, weights, new_state = model.step(state, y_prev, i)
        out, _, _ = dec.step_tokens(state, y_prev, i)
        s_i = new_state.hidden["h"][:, -1]

        alpha = additive_weights(model, s_prev, state)  # (B, S)
        torch.testing.assert_close(weights, alpha, atol=1e-10, rtol=0)
        assert not torch.allclose(weights, additive_weights(model, s_i, state), atol=1e-4), \
            "the test cannot tell s_{i-1} from s_i"
        c_i = torch.einsum("bs,bsh->bh", alpha, state.memory)  # Σ_j α_ij h_j

        Ey = dec.embed(y_prev)  # (B, E)
        t_tilde = s_prev @ dec.U_o.weight.T + Ey @ dec.V_o.weight.T + dec.V_o.bias + c_i @ dec.C_o.weight.T
        t_i = maxout_pool2(t_tilde)  # (B, l)
        torch.testing.assert_close(out, t_i, atol=1e-10, rtol=0)
        W_o = model.generator
        expected_logp = F.log_softmax(t_i @ W_o.weight.T + W_o.bias, dim=-1)  # search's log p is fp32
        torch.testing.assert_close(logp, expected_logp.float(), atol=1e-5, rtol=0)

        torch.testing.assert_close(s_i, cell(torch.cat([Ey, c_i], 1), s_prev), atol=1e-10, rtol=0)
        y_prev = logp.argmax(-1)
        state = new_state


@torch.no_grad()
def test_bahdanau_query_is_previous_top_state_when_stacked() -> None:
    """With two decoder layers the query is the top layer's s_{i-1}."""
    model = make_model(layers=2)
    src, lengths = make_source()
    state = model.encode(src, lengths)
    y = torch.full((len(LENGTHS),), BOS)
    for i in (1, 2):
        _, weights, new_state = model.step(state, y, i)
        torch.testing.assert_close(weights, additive_weights(model, state.hidden["h"][:, -1], state),
                                   atol=1e-10, rtol=0)
        state, y = new_state, torch.full_like(y, 5 + i)


@torch.no_grad()
def test_bahdanau_initial_state_is_tanh_Ws_backward_h1() -> None:
    """s_0 = tanh(W_s ←h_1): bridge 'auto' picks 'backward'; ←h_1 is recomputed here by running
    the encoder's backward GRU weights from the last real word down to the first."""
    model = make_model()
    assert model.config.bridge == "backward"
    enc_rnn = model.encoder.rnn
    half = model.config.hidden_size // 2
    back = torch.nn.GRUCell(model.config.embed_size, half).to(F64)
    back.weight_ih.copy_(enc_rnn.weight_ih_l0_reverse)
    back.weight_hh.copy_(enc_rnn.weight_hh_l0_reverse)
    back.bias_ih.copy_(enc_rnn.bias_ih_l0_reverse)
    back.bias_hh.copy_(enc_rnn.bias_hh_l0_reverse)
    src, lengths = make_source()
    state = model.encode(src, lengths)
    W_s = model.bridge.proj["h"]
    for b, n in enumerate(LENGTHS):
        h = torch.zeros(1, half, dtype=F64)
        for j in reversed(range(n)):  # ←h_j = GRU(←h_{j+1}, x_j), padding never read
            h = back(model.encoder.embed(src[b:b + 1, j]), h)
        torch.testing.assert_close(state.memory[b, 0, half:], h[0], atol=1e-10, rtol=0)  # annotation h_1
        s0 = torch.tanh(W_s.weight @ h[0] + W_s.bias)
        torch.testing.assert_close(state.hidden["h"][b, 0], s0, atol=1e-10, rtol=0)


@torch.no_grad()
def test_rnnencdec_uses_the_fixed_summary() -> None:
    """Decoder 'none': no attention; every step's context is the encoder summary c = [→h_S; ←h_1]
    (top layer), fed to the GRU and the deep output like RNNsearch's c_i."""
    model = make_model(decoder="none", attention="none", bridge="projection")
    dec = model.decoder
    src, lengths = make_source()
    enc = model.encoder(src, lengths)
    summary = enc.final_h[-1]  # (B, H)
    half = model.config.hidden_size // 2
    for b, n in enumerate(LENGTHS):  # forward state at the last real word, backward at the first
        torch.testing.assert_close(summary[b, :half], enc.states[b, n - 1, :half], atol=1e-12, rtol=0)
        torch.testing.assert_close(summary[b, half:], enc.states[b, 0, half:], atol=1e-12, rtol=0)
    state = model.encode(src, lengths)
    cell = cell_like(dec, "gru")
    y = torch.full((len(LENGTHS),), BOS)
    for i in (1, 2):
        s_prev = state.hidden["h"][:, -1]
        out, weights, new_state = dec.step_tokens(state, y, i)
        assert weights is None
        Ey = dec.embed(y)
        t_tilde = s_prev @ dec.U_o.weight.T + Ey @ dec.V_o.weight.T + dec.V_o.bias + summary @ dec.C_o.weight.T
        torch.testing.assert_close(out, maxout_pool2(t_tilde), atol=1e-10, rtol=0)
        torch.testing.assert_close(new_state.hidden["h"][:, -1], cell(torch.cat([Ey, summary], 1), s_prev),
                                   atol=1e-10, rtol=0)
        state, y = new_state, torch.full_like(y, 6)


# ----------------------------------------------------------------------------- Luong

@pytest.mark.parametrize("input_feed", [True, False], ids=["input-feed", "no-input-feed"])
@torch.no_grad()
def test_luong_step_equations(input_feed: bool) -> None:
    """Three Luong steps: h_t = LSTM(h_{t-1}, [E y_{t-1}; h̃_{t-1}]) (or E y_{t-1} alone without
    input feeding), a_t from the CURRENT h_t (not h_{t-1}), h̃_t = tanh(W_c [c_t; h_t]),
    p(y_t) = softmax(W_s h̃_t); the feed starts at h̃_0 = 0 and carries h̃_t."""
    model = make_model(decoder="luong", attention="luong-general", rnn="lstm", input_feed=input_feed)
    dec = model.decoder
    assert (dec.rnn.extra_proj is not None) == input_feed
    src, lengths = make_source()
    state = model.encode(src, lengths)
    cell = cell_like(dec, "lstm")
    B = len(LENGTHS)
    if input_feed:
        assert torch.equal(state.hidden["feed"], torch.zeros(B, model.config.hidden_size, dtype=F64))
    else:
        assert "feed" not in state.hidden
    feed = torch.zeros(B, model.config.hidden_size, dtype=F64)  # h̃_0
    y = torch.full((B,), BOS)
    for t in (1, 2, 3):
        h_prev, c_prev = state.hidden["h"][:, -1], state.hidden["c"][:, -1]
        logp, weights, new_state = model.step(state, y, t)
        out, _, _ = dec.step_tokens(state, y, t)
        Ey = dec.embed(y)
        x = torch.cat([Ey, feed], 1) if input_feed else Ey
        h_t, c_t = cell(x, (h_prev, c_prev))
        torch.testing.assert_close(new_state.hidden["h"][:, -1], h_t, atol=1e-10, rtol=0)
        torch.testing.assert_close(new_state.hidden["c"][:, -1], c_t, atol=1e-10, rtol=0)

        a_t = general_weights(model, h_t, state)
        torch.testing.assert_close(weights, a_t, atol=1e-10, rtol=0)
        assert not torch.allclose(weights, general_weights(model, h_prev, state), atol=1e-4)
        context = torch.einsum("bs,bsh->bh", a_t, state.memory)
        h_tilde = torch.tanh(torch.cat([context, h_t], 1) @ dec.W_c.weight.T)
        torch.testing.assert_close(out, h_tilde, atol=1e-10, rtol=0)
        W_s = model.generator
        expected_logp = F.log_softmax(h_tilde @ W_s.weight.T + W_s.bias, dim=-1)  # search's log p is fp32
        torch.testing.assert_close(logp, expected_logp.float(), atol=1e-5, rtol=0)
        if input_feed:
            torch.testing.assert_close(new_state.hidden["feed"], h_tilde, atol=1e-12, rtol=0)
        feed, state, y = h_tilde, new_state, logp.argmax(-1)


@torch.no_grad()
def test_input_feed_changes_the_next_step() -> None:
    """With input feeding the previous h̃ enters the next step; without it nothing carries it."""
    src, lengths = make_source()
    y = torch.full((len(LENGTHS),), 7)
    for input_feed in (True, False):
        model = make_model(decoder="luong", attention="luong-general", rnn="lstm", input_feed=input_feed)
        state = model.encode(src, lengths)
        other = dataclasses.replace(
            state, hidden={**state.hidden, **({"feed": torch.ones_like(state.hidden["feed"])} if input_feed else {})})
        a, _, _ = model.step(state, y, 1)
        b, _, _ = model.step(other, y, 1)
        assert torch.allclose(a, b) != input_feed


# ----------------------------------------------------------------------------- teacher forcing

DECODER_VARIANTS = {
    "luong": dict(decoder="luong", attention="luong-general", rnn="lstm"),
    "luong-no-input-feed": dict(decoder="luong", attention="luong-dot", rnn="lstm", input_feed=False),
    "luong-local-m": dict(decoder="luong", attention="luong-concat", rnn="lstm", window="local-m", window_size=1),
    "luong-local-p": dict(decoder="luong", attention="luong-location", rnn="gru", window="local-p",
                          window_size=1, max_source_len=8),
    "bahdanau": dict(decoder="bahdanau", attention="bahdanau", rnn="gru", layers=2),
    "bahdanau-local-m": dict(decoder="bahdanau", attention="luong-general", rnn="lstm", window="local-m",
                             window_size=1),
    "none": dict(decoder="none", attention="none", rnn="gru", encoder="rnn"),
}


@pytest.mark.parametrize("name", list(DECODER_VARIANTS))
@torch.no_grad()
def test_teacher_forcing_equals_step_by_step(name: str) -> None:
    """forward(tgt_in) gives the same logits and attention as step_tokens one token at a time
    (the step numbers t = 1, 2, ... matter for local-m)."""
    model = make_model(**DECODER_VARIANTS[name])
    src, lengths = make_source()
    tgt_in = torch.tensor([[BOS, 5, 6, 7, 8, 9], [BOS, 9, 8, 7, 6, 5], [BOS, 4, 4, 4, 4, 4]])
    logits, attn = model(src, lengths, tgt_in)
    state = model.encode(src, lengths)
    for t in range(tgt_in.size(1)):
        out, weights, state = model.decoder.step_tokens(state, tgt_in[:, t], t + 1)
        torch.testing.assert_close(model.generator(out), logits[:, t], atol=1e-10, rtol=0)
        if attn is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, attn[:, t], atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- encoders

@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse-source"])
@torch.no_grad()
def test_encoder_states_are_in_source_order(reverse: bool) -> None:
    """Unidirectional encoder: states are h̄_1..h̄_n in source order whether or not it reads the
    source reversed; recomputed here per sentence without padding. Reading reversed, h̄_j has
    seen words j..n (changing word 1 changes only h̄_1); reading forward, words 1..j."""
    model = make_model(encoder="rnn", decoder="luong", attention="luong-dot", rnn="lstm", layers=2,
                       reverse_source=reverse)
    encoder = model.encoder
    src, lengths = make_source()
    enc = encoder(src, lengths)
    for b, n in enumerate(LENGTHS):
        emb = encoder.embed(src[b:b + 1, :n])  # (1, n, E)
        states, (h_n, _) = encoder.rnn(emb.flip(1) if reverse else emb)
        expected = states.flip(1) if reverse else states
        torch.testing.assert_close(enc.states[b, :n], expected[0], atol=1e-10, rtol=0)
        assert (enc.states[b, n:] == 0).all()  # padding stays at the end
        torch.testing.assert_close(enc.final_h[:, b], h_n[:, 0], atol=1e-10, rtol=0)
        last_read = 0 if reverse else n - 1
        torch.testing.assert_close(enc.final_h[-1, b], enc.states[b, last_read], atol=1e-12, rtol=0)

    changed = src.clone()
    changed[0, 0] = 11 if src[0, 0] != 11 else 10  # first word of the 6-word sentence
    enc2 = encoder(changed, lengths)
    differs = [(enc2.states[0, j] - enc.states[0, j]).abs().max() > 1e-8 for j in range(LENGTHS[0])]
    assert differs == ([True] + [False] * (LENGTHS[0] - 1) if reverse else [True] * LENGTHS[0])


@torch.no_grad()
def test_birnn_annotations_concatenate_both_directions() -> None:
    """Bahdanau §3.2: h_j = [→h_j; ←h_j]; a change to word j reaches →h_k for k ≥ j and ←h_k for k ≤ j."""
    model = make_model()
    src, lengths = make_source()
    enc = model.encoder(src, lengths)
    changed = src.clone()
    j = 2
    changed[0, j] = 11 if src[0, j] != 11 else 10
    enc2 = model.encoder(changed, lengths)
    half = model.config.hidden_size // 2
    moved = (enc2.states[0] - enc.states[0]).abs() > 1e-8  # (S, H)
    for k in range(LENGTHS[0]):
        assert bool(moved[k, :half].any()) == (k >= j)
        assert bool(moved[k, half:].any()) == (k <= j)
