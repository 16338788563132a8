"""SentencePiece subword models: train, encode, decode.

The serialized model bytes travel inside binarized data directories and checkpoints, so a
checkpoint alone can translate raw text. Special ids are fixed for every model nmtkit trains.
"""

from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """Raw text <-> ids for one language (or both, for a joint model)."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD, UNK, BOS, EOS):
            raise ValueError("sentencepiece model does not use nmtkit's special ids (pad 0, unk 1, bos 2, eos 3)")

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, model_type: str = "unigram",
              character_coverage: float = 1.0, threads: int = 2) -> "Tokenizer":
        """Train a model on ``sentences``; ``vocab_size`` is a soft limit on tiny corpora."""
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, hard_vocab_limit=False,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=threads,
            minloglevel=2,
        )
        return cls(buffer.getvalue())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(len(self))]

    def word_of_piece(self, text: str) -> tuple[list[int], int]:
        """For each subword of ``text``, the index of the whitespace-separated word it belongs to.

        Returns (word index per piece, number of words). SentencePiece marks a word's first piece
        with '▁', so words are counted as the model segments them (after its normalisation, which
        only in rare cases, e.g. full-width spaces, differs from ``text.split()``).
        """
        words, index = [], -1
        for piece in self.sp.encode(text, out_type=str):
            if piece.startswith("\u2581") or index < 0:
                index += 1
            words.append(index)
        return words, index + 1
