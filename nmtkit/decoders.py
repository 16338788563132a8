"""Decoders: 'luong' (Luong et al. 2015), 'bahdanau' (RNNsearch, Bahdanau et al. 2015) and 'none'
(RNNencdec, the attention-free baseline of Bahdanau et al. 2015 §4.2).

Every decoder offers ``init_state`` (from the encoder output and the bridge), ``step`` (one target
position; used by search) and ``forward`` (teacher forcing over a whole target). Work that does
not depend on the step is done once outside the step loop: the encoder-side attention keys, the
embedding part of the first layer's input projection (and of the deep output) for all steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from nmtkit.attention import build_attention
from nmtkit.config import ModelConfig
from nmtkit.encoders import EncoderOutput
from nmtkit.kernels import (Dropout, Linear, PackedLinear, SharedLinear, compute_dtype, dropout_mask, gru_cell,
                            lstm_cell, pack_weight, page_out, tanh)
from nmtkit.registry import DECODERS
from nmtkit.tokenizer import PAD


@dataclass
class DecoderState:
    """Everything a decoder step reads; every tensor has the batch on dim 0.

    ``memory``, ``keys``, ``mask`` and ``lengths`` are fixed per sentence, one row each (B);
    ``hidden`` changes every step and has one row per hypothesis: B·beam rows, the hypotheses of
    sentence b in rows b·beam … b·beam + beam − 1, which query b's memory together (``with_beam``).
    """

    memory: torch.Tensor  # (B, S, Hm) encoder states h̄_s
    keys: torch.Tensor  # (B, S, K) precomputed attention projection of the memory
    mask: torch.Tensor  # (B, S) bool
    lengths: torch.Tensor  # (B,) source lengths
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)  # h, c (N, L, H); feed (N, H); N = B·beam
    plan: dict[str, Any] = field(default_factory=dict)  # per-batch step weights (Decoder.plan), shared by all rows
    beam: int = 1  # hypotheses per sentence

    def with_beam(self, beam: int) -> "DecoderState":
        """``beam`` hypotheses per sentence: the recurrent part repeated, the memory not copied."""
        index = torch.arange(self.memory.size(0), device=self.memory.device).repeat_interleave(beam)
        return replace(self, hidden={k: v.index_select(0, index) for k, v in self.hidden.items()}, beam=beam)

    def select(self, index: torch.Tensor, sentences: torch.Tensor | None = None) -> "DecoderState":
        """Hypothesis rows ``index`` of the recurrent part and sentence rows ``sentences`` (default:
        ``index``, for one hypothesis per sentence) of the rest: finished sentences leave."""
        rows = index if sentences is None else sentences
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return DecoderState(pick(self.memory), pick(self.keys), pick(self.mask), pick(self.lengths),
                            {k: v.index_select(0, index) for k, v in self.hidden.items()}, self.plan, self.beam)

    def narrow(self, rows: int) -> "DecoderState":
        """The first ``rows`` sentences, one hypothesis each, as views (teacher forcing over rows
        sorted by target length: sentences whose targets have ended leave the batch)."""
        cut = lambda t: t[:rows]  # noqa: E731
        return DecoderState(cut(self.memory), cut(self.keys), cut(self.mask), cut(self.lengths),
                            {k: cut(v) for k, v in self.hidden.items()}, self.plan, self.beam)

    def reorder(self, index: torch.Tensor) -> "DecoderState":
        """Rows ``index`` of the recurrent part only (hypotheses move within their sentence)."""
        return replace(self, hidden={k: v.index_select(0, index) for k, v in self.hidden.items()})


class StackedRNN(nn.Module):
    """A stack of LSTM or GRU cells run one step at a time.

    Layer 0's input is [x; extra] where x (the target embedding) is known for all steps under
    teacher forcing: its projection ``embed_proj`` is computed for all steps at once and passed in
    (``pre``); only ``extra`` (input feed or context) is projected per step. Cells follow
    torch.nn.LSTMCell / GRUCell exactly (GRU: n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))).

    Speed (``plan``, built once per batch): for LSTM each layer's input and recurrent matmuls are
    one addmm over [x; h] with the weights [W_x W_h] concatenated once per batch (and cast once to
    the autocast dtype); under autograd their weight gradients are deferred to one large matmul
    after the loop (nmtkit.kernels.SharedLinear); the gates' pointwise part runs in fp32, so the
    cell state never accumulates in bf16. ``fuse_for_inference`` builds the concatenated layers
    as nn.Linear modules once, so that translation neither re-concatenates weights per batch nor
    hides them from dynamic quantization.
    """

    def __init__(self, rnn: str, input_size: int, extra_size: int, hidden_size: int, layers: int,
                 dropout: float) -> None:
        super().__init__()
        self.lstm = rnn == "lstm"
        gates = (4 if self.lstm else 3) * hidden_size
        self.embed_proj = Linear(input_size, gates)  # layer 0, with the input bias
        self.extra_proj = Linear(extra_size, gates, bias=False) if extra_size else None
        self.input_proj = nn.ModuleList(Linear(hidden_size, gates) for _ in range(layers - 1))
        self.hidden_proj = nn.ModuleList(Linear(hidden_size, gates) for _ in range(layers))
        self.dropout = Dropout(dropout)
        self.layers = layers
        self.hidden_size = hidden_size
        self.fused: nn.ModuleList | None = None  # set by fuse_for_inference (never in a state dict)

    def _layer_weights(self, layer: int):
        """(W_x, b_x, W_h, b_h) of one layer; W_x is None for layer 0 without an extra input."""
        if layer == 0:
            x_proj, b_x = self.extra_proj, None
            w_x = None if x_proj is None else x_proj.weight
        else:
            w_x, b_x = self.input_proj[layer - 1].weight, self.input_proj[layer - 1].bias
        return w_x, b_x, self.hidden_proj[layer].weight, self.hidden_proj[layer].bias

    @torch.no_grad()
    def fuse_for_inference(self, pack: bool = False) -> None:
        """Build per-layer [W_x W_h] linear modules (LSTM) for translation; weights are copies,
        so call this after the weights are final (translate does, after loading a checkpoint).
        ``pack``: keep each fused weight only in oneDNN's blocked layout (``PackedLinear``, fp32
        CPU), not also as a plain copy (16 MB for the reference model)."""
        if not self.lstm:
            return
        fused = []
        for layer in range(self.layers):
            w_x, b_x, w_h, b_h = self._layer_weights(layer)
            weight = w_h if w_x is None else torch.cat([w_x, w_h], 1)  # (4H, in + H)
            bias = b_h if b_x is None else b_x + b_h  # (4H,)
            packed = pack_weight(weight) if pack else None
            if packed is not None:
                fused.append(PackedLinear(packed, bias.clone()))
                continue
            layer_linear = Linear(weight.size(1), weight.size(0), device=weight.device, dtype=weight.dtype)
            layer_linear.weight.copy_(weight)
            layer_linear.bias.copy_(bias)
            fused.append(layer_linear)
        self.fused = nn.ModuleList(fused)
        self.fused.requires_grad_(False)
        page_out(*(w for layer in range(self.layers) for w in self._layer_weights(layer)))  # now unused

    def state_dict(self, *args, **kwargs):
        """The parameters only: the fused inference layers are derived copies, never saved."""
        fused = self._modules.pop("fused", None)
        try:
            return super().state_dict(*args, **kwargs)
        finally:
            if fused is not None:
                self._modules["fused"] = fused

    def plan(self) -> list:
        """Per-batch callables per layer: LSTM: [x; h] -> gates; GRU: (x -> gates or None, h -> gates)."""
        if self.fused is not None:
            return [_module_call(m) for m in self.fused]
        weight0 = self.hidden_proj[0].weight
        dtype = compute_dtype(weight0.dtype, weight0.device.type)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        plan = []
        for layer in range(self.layers):
            w_x, b_x, w_h, b_h = self._layer_weights(layer)
            if self.lstm:
                weight = w_h if w_x is None else torch.cat([w_x, w_h], 1)
                plan.append(SharedLinear(cast(weight), cast(b_h if b_x is None else b_x + b_h)))
            else:
                plan.append((None if w_x is None else SharedLinear(cast(w_x), cast(b_x)),
                             SharedLinear(cast(w_h), cast(b_h))))
        return plan

    def dropout_masks(self, steps: int, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """Inverted-dropout masks between layers for all steps at once (T, L-1, B, H), or None."""
        if not (self.training and self.dropout.p > 0 and self.layers > 1):
            return None
        return dropout_mask((steps, self.layers - 1, batch, self.hidden_size), self.dropout.p, like.device)

    def step(self, pre: torch.Tensor, extra: torch.Tensor | None, h: torch.Tensor,
             c: torch.Tensor | None, plan: list | None = None, drop: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pre (B, G) = embed_proj(x_t), extra (B, X), h/c (B, L, H) -> new h, c (B, L, H).

        ``plan`` from ``plan()`` (built here when not given); ``drop`` (L-1, B, H) the step's
        dropout masks between layers (None: ``self.dropout`` is applied, a no-op in eval).
        """
        plan = self.plan() if plan is None else plan
        new_h, new_c = [], []
        x = extra
        hs = h.unbind(1)  # one op (and one stack in backward), not a select per layer
        cs = c.unbind(1) if self.lstm else None
        for layer in range(self.layers):
            if layer:
                below = new_h[-1]
                x = below * drop[layer - 1] if drop is not None else self.dropout(below)
            h_l = hs[layer]
            if self.lstm:
                xh = h_l if x is None else torch.cat([x.to(h_l.dtype), h_l], 1)
                h_new, c_new = lstm_cell(plan[layer](xh), cs[layer], pre if layer == 0 else None)
                new_c.append(c_new)
            else:
                x_proj, h_proj = plan[layer]
                if x_proj is None:  # layer 0 without an extra input: the embedding's projection alone
                    h_new = gru_cell(pre, h_proj(h_l), h_l)
                else:
                    h_new = gru_cell(x_proj(x), h_proj(h_l), h_l, pre if layer == 0 else None)
            new_h.append(h_new)
        return torch.stack(new_h, 1), (torch.stack(new_c, 1) if self.lstm else None)


def _module_call(module: nn.Module):
    """module(x) with x cast to the module's floating weight dtype (fp32 for quantized modules)."""
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    return lambda x: module(x.to(dtype))


def per_step(module: nn.Module):
    """A per-batch callable equal to ``module`` for a layer applied at every step: under autograd
    an nn.Linear becomes a SharedLinear (weight cast once, weight gradient deferred)."""
    if isinstance(module, nn.Linear) and torch.is_grad_enabled() and module.weight.requires_grad:
        dtype = compute_dtype(module.weight.dtype, module.weight.device.type)
        bias = None if module.bias is None else module.bias.to(dtype)
        return SharedLinear(module.weight.to(dtype), bias)
    return _module_call(module)


ROW_STEP = 8
"""Teacher forcing drops ended sentences in groups of this many rows: the step products see a few
row counts per batch (multiples of 8, each a ``kernels.bucket_rows`` size), so oneDNN builds few
primitives (bf16 ones up to 4 MB each) and never pads rows; a few ended rows run on meanwhile."""


class Decoder(nn.Module):
    """Shared parts: target embedding, stacked RNN, attention, state set-up, teacher forcing."""

    output_size: int

    def __init__(self, cfg: ModelConfig, memory_size: int, extra_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.tgt_vocab_size, cfg.embed_size, padding_idx=PAD)
        self.rnn = StackedRNN(cfg.rnn, cfg.embed_size, extra_size, cfg.hidden_size, cfg.layers, cfg.dropout)
        self.dropout = Dropout(cfg.dropout)
        self.attention = (build_attention(cfg, cfg.hidden_size, memory_size)
                          if cfg.attention != "none" else None)
        self.hidden_size = cfg.hidden_size

    def init_state(self, enc: EncoderOutput, h0: torch.Tensor, c0: torch.Tensor | None) -> DecoderState:
        """h0, c0 (B, L, H) from the bridge."""
        keys = self.attention.keys(enc.states) if self.attention is not None else enc.states[:, :, :0]
        hidden = {"h": h0}
        if c0 is not None:
            hidden["c"] = c0
        plan = self.plan()
        if self.attention is not None:
            plan["attend"] = self.attention.per_batch(keys, enc.states)
        return DecoderState(enc.states, keys, enc.mask, enc.lengths, hidden, plan)

    def plan(self) -> dict[str, Any]:
        """Per-batch callables for the layers used at every step (see StackedRNN.plan)."""
        return {"rnn": self.rnn.plan()}

    def attend(self, state: DecoderState, query: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (N, Hq) at 1-based target step t -> context (N, Hm), weights (N, S); N = B·beam:
        a sentence's hypotheses are the attention's ``beam`` query positions over its memory."""
        N, K = query.size(0), state.beam
        steps = torch.full((K,), t, device=query.device)
        context, weights = self.attention(query.view(N // K, K, -1), state.keys, state.memory, state.mask,
                                          state.lengths, steps, state.plan.get("attend"))  # (B, K, Hm), (B, K, S)
        return context.reshape(N, -1), weights.reshape(N, -1)

    def precompute(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-step inputs that depend only on the embedded targets emb (B, T, E)."""
        return {"rnn": self.rnn.embed_proj(emb)}  # (B, T, G)

    def step(self, state: DecoderState, pre: dict[str, torch.Tensor], t: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderState]:
        """One target step from precomputed inputs -> output before dropout (B, O), weights (B, S),
        new state. ``pre`` may hold "drop": the step's dropout masks between RNN layers."""
        raise NotImplementedError

    def step_tokens(self, state: DecoderState, y_prev: torch.Tensor, t: int):
        """One target step from the previous tokens y_prev (B,) (search)."""
        emb = self.dropout(self.embed(y_prev))  # (B, E)
        out, weights, state = self.step(state, self.precompute(emb), t)
        return self.dropout(out), weights, state

    def forward(self, state: DecoderState, tgt_in: torch.Tensor, steps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: tgt_in (B, T) -> outputs (B, T, O), attention weights (B, T, S).

        Step-independent work is done here for all steps at once: embeddings and their input
        projections, the dropout masks between RNN layers, and the dropout of the outputs.
        ``steps`` (B,) non-increasing, the number of target steps of each sentence (training):
        sentences leave the batch after their last step, in groups of ``ROW_STEP`` rows (so next
        to no work on target padding: 22 % of the benchmark's target positions), and the outputs
        come packed time-major, (N, O) = step 1's live rows, then step 2's, ..., weights None.
        """
        B, T = tgt_in.shape
        pre = self.precompute(self.dropout(self.embed(tgt_in)))  # each (B, T, ...)
        # unbind, not v[:, t]: its backward is one stack, not T full-size zero tensors and sums
        inputs: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
        for k, v in pre.items():
            for t, v_t in enumerate(v.unbind(1)):
                inputs[t][k] = v_t
        drop = self.rnn.dropout_masks(T, B, tgt_in)  # (T, L-1, B, H) or None
        if drop is not None:
            for t, d in enumerate(drop.unbind(0)):
                inputs[t]["drop"] = d
        # sentences running at each step: all, or those with more than t steps (a prefix: sorted)
        live = [B] * T if steps is None else (steps.cpu() > torch.arange(T).unsqueeze(1)).sum(1).tolist()
        outputs, weights = [], []
        for t in range(T):
            n = min(B, -(-live[t] // ROW_STEP) * ROW_STEP)  # rows computed: the first n
            if n < state.hidden["h"].size(0):
                state = state.narrow(n)
            if n < B:
                inputs[t] = {k: v[:, :n] if k == "drop" else v[:n] for k, v in inputs[t].items()}
            out, a, state = self.step(state, inputs[t], t + 1)
            outputs.append(out if live[t] == n else out[:live[t]])
            weights.append(a)
        if steps is not None:
            return self.dropout(torch.cat(outputs, 0)), None
        attn = torch.stack(weights, 1) if weights[0] is not None else None
        return self.dropout(torch.stack(outputs, 1)), attn


@DECODERS.register("luong")
class LuongDecoder(Decoder):
    """Luong et al. 2015 §3: h_t = RNN(h_{t-1}, [E y_{t-1}; h̃_{t-1}]) (input feeding, §3.3,
    switchable off), attention queried with the CURRENT top state h_t,
    h̃_t = tanh(W_c [c_t; h_t]) (eq. 5); p(y_t) = softmax(W_s h̃_t) (eq. 6) in the generator."""

    def __init__(self, cfg: ModelConfig, memory_size: int) -> None:
        self.input_feed = cfg.input_feed
        super().__init__(cfg, memory_size, cfg.hidden_size if cfg.input_feed else 0)
        self.W_c = Linear(memory_size + cfg.hidden_size, cfg.hidden_size, bias=False)
        self.output_size = cfg.hidden_size

    def plan(self):
        return {**super().plan(), "W_c": per_step(self.W_c)}

    def init_state(self, enc, h0, c0):
        state = super().init_state(enc, h0, c0)
        if self.input_feed:
            state.hidden["feed"] = h0.new_zeros(h0.size(0), self.hidden_size)  # h̃_0 = 0
        return state

    def step(self, state, pre, t):
        hidden = state.hidden
        h, c = self.rnn.step(pre["rnn"], hidden.get("feed"), hidden["h"], hidden.get("c"), state.plan["rnn"],
                             pre.get("drop"))
        top = h[:, -1]  # h_t (B, H)
        context, weights = self.attend(state, top, t)
        h_tilde = tanh(state.plan["W_c"](torch.cat([context, top.to(context.dtype)], dim=1)))  # (B, H)
        new = {"h": h}
        if c is not None:
            new["c"] = c
        if self.input_feed:
            new["feed"] = h_tilde
        return h_tilde, weights, replace(state, hidden=new)


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
        self.U_o = Linear(cfg.hidden_size, 2 * pooled, bias=False)
        self.V_o = Linear(cfg.embed_size, 2 * pooled)
        self.C_o = Linear(memory_size, 2 * pooled, bias=False)
        self.output_size = pooled

    def precompute(self, emb):
        return {"rnn": self.rnn.embed_proj(emb), "out": self.V_o(emb)}

    def plan(self):
        return {**super().plan(), "U_o": per_step(self.U_o), "C_o": per_step(self.C_o)}

    def context(self, state: DecoderState, query: torch.Tensor, t: int):
        return self.attend(state, query, t)

    def step(self, state, pre, t):
        hidden = state.hidden
        s_prev = hidden["h"][:, -1]  # s_{i-1} (B, H)
        context, weights = self.context(state, s_prev, t)  # c_i
        t_tilde = state.plan["U_o"](s_prev) + pre["out"] + state.plan["C_o"](context)  # (B, 2l)
        t_out = t_tilde.view(t_tilde.size(0), -1, 2).max(dim=-1).values  # maxout_pool2 (B, l)
        h, c = self.rnn.step(pre["rnn"], context, hidden["h"], hidden.get("c"), state.plan["rnn"],
                             pre.get("drop"))  # s_i
        new = {"h": h} if c is None else {"h": h, "c": c}
        return t_out, weights, replace(state, hidden=new)


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
