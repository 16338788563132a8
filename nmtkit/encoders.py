"""Encoders: 'rnn' (unidirectional) and 'birnn' (bidirectional), LSTM or GRU, stacked.

Bahdanau et al. 2015 §3.2: a bidirectional RNN whose annotation h_j = [→h_j; ←h_j]. Luong et al.
2015 §3 use a stacked unidirectional LSTM, optionally reading the source reversed ("+reverse",
after Sutskever et al. 2014). Encoder outputs are always returned in source order, so attention
positions (and alignments, and local-m's p_t = t) refer to source words as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmtkit.config import ModelConfig
from nmtkit.kernels import Dropout, lstm_sequence, reverse_padded
from nmtkit.registry import ENCODERS
from nmtkit.tokenizer import PAD


@dataclass
class EncoderOutput:
    states: torch.Tensor  # (B, S, H) annotations h̄_s, in source order
    mask: torch.Tensor  # (B, S) bool, True at real tokens
    lengths: torch.Tensor  # (B,) long
    final_h: torch.Tensor  # (L, B, H) last state per layer; birnn: [→h_S; ←h_1]
    final_c: torch.Tensor | None  # (L, B, H) LSTM cell states, else None


class RNNEncoder(nn.Module):
    """Embedding + stacked (bi)RNN over packed sequences."""

    bidirectional = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        directions = 2 if self.bidirectional else 1
        self.embed = nn.Embedding(cfg.src_vocab_size, cfg.embed_size, padding_idx=PAD)
        self.dropout = Dropout(cfg.dropout)
        rnn_class = nn.LSTM if cfg.rnn == "lstm" else nn.GRU
        self.rnn = rnn_class(
            cfg.embed_size, cfg.hidden_size // directions, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, bidirectional=self.bidirectional,
        )
        self.reverse_source = cfg.reverse_source
        self.output_size = cfg.hidden_size
        self.layers = cfg.layers

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        B, S = src.shape
        mask = src != PAD  # (B, S)
        emb = self.dropout(self.embed(src))  # (B, S, E)
        if self.reverse_source:
            emb = reverse_padded(emb, lengths)
        if type(self.rnn) is nn.LSTM and self.training and torch.is_grad_enabled() and emb.device.type == "cpu":
            # same function as packed sequences, with a faster backward on CPU (kernels.lstm_sequence);
            # without gradients nn.LSTM is as fast and holds less memory (translation, bench/README.md);
            # on a GPU cuDNN's fused LSTM runs the whole sequence in a few kernels
            states, final = lstm_sequence(self.rnn, emb, lengths)
        else:
            packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, final = self.rnn(packed)
            states, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, H)
        if self.reverse_source:
            states = reverse_padded(states, lengths)
        h, c = final if isinstance(final, tuple) else (final, None)
        return EncoderOutput(self.dropout(states), mask, lengths, self._layers(h),
                             None if c is None else self._layers(c))

    def _layers(self, h: torch.Tensor) -> torch.Tensor:
        """(L * dirs, B, H/dirs) -> (L, B, H), directions concatenated per layer."""
        if not self.bidirectional:
            return h
        L2, B, half = h.shape
        return h.view(self.layers, 2, B, half).permute(0, 2, 1, 3).reshape(self.layers, B, 2 * half)


@ENCODERS.register("rnn")
class UniEncoder(RNNEncoder):
    """Stacked unidirectional RNN (Luong et al. 2015 §3; '+reverse' with --reverse-source)."""


@ENCODERS.register("birnn")
class BiEncoder(RNNEncoder):
    """Bidirectional RNN, h_j = [→h_j; ←h_j] (Bahdanau et al. 2015 §3.2); each direction H/2."""

    bidirectional = True
