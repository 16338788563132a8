"""Decoders: 'luong' (Luong et al. 2015), 'bahdanau' (RNNsearch, Bahdanau et al. 2015) and 'none'
(RNNencdec, the attention-free baseline of Bahdanau et al. 2015 §4.2).

Every decoder offers ``init_state`` (from the encoder output and the bridge), ``step`` (one target
position; used by search) and ``forward`` (teacher forcing over a whole target). Work that does
not depend on the step is done once outside the step loop: the encoder-side attention keys, the
embedding part of the first layer's input projection (and of the deep output) for all steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from nmtkit.attention import build_attention
from nmtkit.config import ModelConfig
from nmtkit.encoders import EncoderOutput
from nmtkit.registry import DECODERS
from nmtkit.tokenizer import PAD


@dataclass
class DecoderState:
    """Everything a decoder step reads; every tensor has the batch on dim 0.

    ``memory``, ``keys``, ``mask`` and ``lengths`` are fixed per sentence (beam search reorders
    them only when finished sentences leave the batch); ``hidden`` changes every step.
    """

    memory: torch.Tensor  # (B, S, Hm) encoder states h̄_s
    keys: torch.Tensor  # (B, S, K) precomputed attention projection of the memory
    mask: torch.Tensor  # (B, S) bool
    lengths: torch.Tensor  # (B,) source lengths
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # h, c (B, L, H); feed (B, H)

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Rows ``index`` of everything (dropping or repeating sentences)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return DecoderState(pick(self.memory), pick(self.keys), pick(self.mask), pick(self.lengths),
                            {k: pick(v) for k, v in self.hidden.items()})

    def reorder(self, index: torch.Tensor) -> "DecoderState":
        """Rows ``index`` of the recurrent part only (beams of one sentence share the memory)."""
        return replace(self, hidden={k: v.index_select(0, index) for k, v in self.hidden.items()})


class StackedRNN(nn.Module):
    """A stack of LSTM or GRU cells run one step at a time.

    Layer 0's input is [x; extra] where x (the target embedding) is known for all steps under
    teacher forcing: its projection ``embed_proj`` is computed for all steps at once and passed in
    (``pre``); only ``extra`` (input feed or context) is projected per step. Cells follow
    torch.nn.LSTMCell / GRUCell exactly (GRU: n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))).
    """

    def __init__(self, rnn: str, input_size: int, extra_size: int, hidden_size: int, layers: int,
                 dropout: float) -> None:
        super().__init__()
        self.lstm = rnn == "lstm"
        gates = (4 if self.lstm else 3) * hidden_size
        self.embed_proj = nn.Linear(input_size, gates)  # layer 0, with the input bias
        self.extra_proj = nn.Linear(extra_size, gates, bias=False) if extra_size else None
        self.input_proj = nn.ModuleList(nn.Linear(hidden_size, gates) for _ in range(layers - 1))
        self.hidden_proj = nn.ModuleList(nn.Linear(hidden_size, gates) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.layers = layers

    def step(self, pre: torch.Tensor, extra: torch.Tensor | None, h: torch.Tensor,
             c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pre (B, G) = embed_proj(x_t), extra (B, X), h/c (B, L, H) -> new h, c (B, L, H)."""
        new_h, new_c = [], []
        x_gates = pre if self.extra_proj is None else pre + self.extra_proj(extra)
        for layer in range(self.layers):
            if layer:
                x_gates = self.input_proj[layer - 1](self.dropout(new_h[-1]))
            h_gates = self.hidden_proj[layer](h[:, layer])  # (B, G)
            if self.lstm:
                i, f, g, o = (x_gates + h_gates).chunk(4, dim=1)
                cell = torch.sigmoid(f) * c[:, layer] + torch.sigmoid(i) * torch.tanh(g)
                new_h.append(torch.sigmoid(o) * torch.tanh(cell))
                new_c.append(cell)
            else:
                xr, xz, xn = x_gates.chunk(3, dim=1)
                hr, hz, hn = h_gates.chunk(3, dim=1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                new_h.append((1 - z) * n + z * h[:, layer])
        return torch.stack(new_h, 1), (torch.stack(new_c, 1) if self.lstm else None)


class Decoder(nn.Module):
    """Shared parts: target embedding, stacked RNN, attention, state set-up, teacher forcing."""

    output_size: int

    def __init__(self, cfg: ModelConfig, memory_size: int, extra_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.tgt_vocab_size, cfg.embed_size, padding_idx=PAD)
        self.rnn = StackedRNN(cfg.rnn, cfg.embed_size, extra_size, cfg.hidden_size, cfg.layers, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention = (build_attention(cfg, cfg.hidden_size, memory_size)
                          if cfg.attention != "none" else None)
        self.hidden_size = cfg.hidden_size

    def init_state(self, enc: EncoderOutput, h0: torch.Tensor, c0: torch.Tensor | None) -> DecoderState:
        """h0, c0 (B, L, H) from the bridge."""
        keys = self.attention.keys(enc.states) if self.attention is not None else enc.states[:, :, :0]
        hidden = {"h": h0}
        if c0 is not None:
            hidden["c"] = c0
        return DecoderState(enc.states, keys, enc.mask, enc.lengths, hidden)

    def attend(self, state: DecoderState, query: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Hq) at 1-based target step t -> context (B, Hm), weights (B, S)."""
        steps = torch.tensor([t], device=query.device)
        context, weights = self.attention(query.unsqueeze(1), state.keys, state.memory, state.mask,
                                          state.lengths, steps)
        return context.squeeze(1), weights.squeeze(1)

    def precompute(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-step inputs that depend only on the embedded targets emb (B, T, E)."""
        return {"rnn": self.rnn.embed_proj(emb)}  # (B, T, G)

    def step(self, state: DecoderState, pre: dict[str, torch.Tensor], t: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderState]:
        """One target step from precomputed inputs -> output (B, O), weights (B, S), new state."""
        raise NotImplementedError

    def step_tokens(self, state: DecoderState, y_prev: torch.Tensor, t: int):
        """One target step from the previous tokens y_prev (B,) (search)."""
        emb = self.dropout(self.embed(y_prev))  # (B, E)
        return self.step(state, self.precompute(emb), t)

    def forward(self, state: DecoderState, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tgt_in (B, T) -> outputs (B, T, O), attention weights (B, T, S)."""
        pre = self.precompute(self.dropout(self.embed(tgt_in)))  # each (B, T, ...)
        outputs, weights = [], []
        for t in range(tgt_in.size(1)):
            out, a, state = self.step(state, {k: v[:, t] for k, v in pre.items()}, t + 1)
            outputs.append(out)
            weights.append(a)
        attn = torch.stack(weights, 1) if weights[0] is not None else None
        return torch.stack(outputs, 1), attn


@DECODERS.register("luong")
class LuongDecoder(Decoder):
    """Luong et al. 2015 §3: h_t = RNN(h_{t-1}, [E y_{t-1}; h̃_{t-1}]) (input feeding, §3.3,
    switchable off), attention queried with the CURRENT top state h_t,
    h̃_t = tanh(W_c [c_t; h_t]) (eq. 5); p(y_t) = softmax(W_s h̃_t) (eq. 6) in the generator."""

    def __init__(self, cfg: ModelConfig, memory_size: int) -> None:
        self.input_feed = cfg.input_feed
        super().__init__(cfg, memory_size, cfg.hidden_size if cfg.input_feed else 0)
        self.W_c = nn.Linear(memory_size + cfg.hidden_size, cfg.hidden_size, bias=False)
        self.output_size = cfg.hidden_size

    def init_state(self, enc, h0, c0):
        state = super().init_state(enc, h0, c0)
        if self.input_feed:
            state.hidden["feed"] = h0.new_zeros(h0.size(0), self.hidden_size)  # h̃_0 = 0
        return state

    def step(self, state, pre, t):
        hidden = state.hidden
        h, c = self.rnn.step(pre["rnn"], hidden.get("feed"), hidden["h"], hidden.get("c"))
        top = h[:, -1]  # h_t (B, H)
        context, weights = self.attend(state, top, t)
        h_tilde = torch.tanh(self.W_c(torch.cat([context, top], dim=1)))  # (B, H)
        new = {"h": h}
        if c is not None:
            new["c"] = c
        if self.input_feed:
            new["feed"] = h_tilde
        return self.dropout(h_tilde), weights, replace(state, hidden=new)


@DECODERS.register("bahdanau")
class BahdanauDecoder(Decoder):
    """RNNsearch exactly (Bahdanau et al. 2015, App. A.2.2): the attention query is the PREVIOUS
    state s_{i-1}; c_i = Σ_j α_ij h_j; s_i = RNN(s_{i-1}, [E y_{i-1}; c_i]); deep output
    t̃_i = U_o s_{i-1} + V_o E y_{i-1} + C_o c_i, t_i = maxout_pool2(t̃_i); p(y_i) = softmax(W_o t_i)
    in the generator. s_0 = tanh(W_s ←h_1) is the 'backward' bridge (chosen by bridge 'auto').
    Biases, omitted in the paper's equations, are kept once (in V_o)."""

    def __init__(self, cfg: ModelConfig, memory_size: int) -> None:
        super().__init__(cfg, memory_size, memory_size)
        pooled = cfg.maxout_size or cfg.hidden_size // 2
        self.U_o = nn.Linear(cfg.hidden_size, 2 * pooled, bias=False)
        self.V_o = nn.Linear(cfg.embed_size, 2 * pooled)
        self.C_o = nn.Linear(memory_size, 2 * pooled, bias=False)
        self.output_size = pooled

    def precompute(self, emb):
        return {"rnn": self.rnn.embed_proj(emb), "out": self.V_o(emb)}

    def context(self, state: DecoderState, query: torch.Tensor, t: int):
        return self.attend(state, query, t)

    def step(self, state, pre, t):
        hidden = state.hidden
        s_prev = hidden["h"][:, -1]  # s_{i-1} (B, H)
        context, weights = self.context(state, s_prev, t)  # c_i
        t_tilde = self.U_o(s_prev) + pre["out"] + self.C_o(context)  # (B, 2l)
        t_out = t_tilde.view(t_tilde.size(0), -1, 2).max(dim=-1).values  # maxout_pool2 (B, l)
        h, c = self.rnn.step(pre["rnn"], context, hidden["h"], hidden.get("c"))  # s_i
        new = {"h": h} if c is None else {"h": h, "c": c}
        return self.dropout(t_out), weights, replace(state, hidden=new)


@DECODERS.register("none")
class EncDecDecoder(BahdanauDecoder):
    """RNNencdec (Cho et al. 2014, the baseline of Bahdanau et al. 2015 §4.2): no attention; the
    context is the fixed encoder summary c (the top layer's final state, directions concatenated),
    fed to every step and to the deep output like RNNsearch's c_i."""

    def init_state(self, enc, h0, c0):
        state = super().init_state(enc, h0, c0)
        summary = enc.final_h[-1]  # (B, Hm)
        state.hidden["summary"] = summary
        return state

    def context(self, state, query, t):
        return state.hidden["summary"], None

    def step(self, state, pre, t):
        out, weights, new_state = super().step(state, pre, t)
        new_state.hidden["summary"] = state.hidden["summary"]
        return out, weights, new_state
