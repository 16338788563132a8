"""Preprocessing and batching: binarized arrays, filtering counts, token-bounded buckets."""

import json

import numpy as np
import pytest

from nmtkit.data import DataDir, PreprocessOptions, collate, preprocess, read_lines, token_batches
from nmtkit.errors import NmtkitError, UsageError
from nmtkit.tokenizer import BOS, EOS, PAD, Tokenizer


def test_preprocess_writes_binarized_data_and_manifest(reverse_corpus, reverse_data):
    data = DataDir(reverse_data)
    manifest = json.loads((reverse_data / "manifest.json").read_text())
    assert manifest["splits"]["train"]["kept"] == len(data.split("train"))
    train = data.split("train")
    src_lines = (reverse_corpus / "train.src").read_text().splitlines()
    tok = Tokenizer(data.tokenizer_bytes("src"))
    for i in (0, 7, len(train) - 1):  # tokens round-trip to the raw text
        assert tok.decode(train.source(i).tolist()) == src_lines[i]
    assert isinstance(train.src_tokens, np.memmap)
    assert manifest["splits"]["train"]["src_tokens"] == int(train.src_lens.sum())


def test_filtering_is_counted(tmp_path):
    (tmp_path / "t.a").write_text("a b\n\nc d e f g h i j\nk\n", encoding="utf-8")
    (tmp_path / "t.b").write_text("x y\nz\nu v\n\n", encoding="utf-8")
    m = preprocess(PreprocessOptions(src="a", tgt="b", train=str(tmp_path / "t"), valid=str(tmp_path / "t"),
                                     out=tmp_path / "d", vocab_size=30, model_type="word", max_len=4),
                   log=lambda _: None)
    assert m["splits"]["train"] == {**m["splits"]["train"], "lines": 4, "kept": 1, "filtered_empty": 2,
                                    "filtered_too_long": 1}


def test_preprocess_refuses_existing_output(reverse_corpus, reverse_data):
    opts = PreprocessOptions(src="src", tgt="tgt", train=str(reverse_corpus / "train"),
                             valid=str(reverse_corpus / "valid"), out=reverse_data)
    with pytest.raises(UsageError, match="--force"):
        preprocess(opts)


def test_mismatched_and_invalid_files(tmp_path):
    (tmp_path / "t.a").write_text("a\nb\n")
    (tmp_path / "t.b").write_text("x\n")
    with pytest.raises(NmtkitError, match=r"t.a has 2 lines, .*t.b has 1"):
        preprocess(PreprocessOptions(src="a", tgt="b", train=str(tmp_path / "t"), valid=str(tmp_path / "t"),
                                     out=tmp_path / "d"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbro\xffken\n")
    with pytest.raises(NmtkitError, match=r"bad.txt:2: invalid UTF-8"):
        read_lines(bad)
    assert read_lines(bad, errors="replace")[1] == "bro\ufffdken"
    with pytest.raises(NmtkitError, match="file not found"):
        preprocess(PreprocessOptions(src="a", tgt="c", train=str(tmp_path / "t"), valid=str(tmp_path / "t"),
                                     out=tmp_path / "d"))


def test_token_batches_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_batches(src, tgt, 300, seed=3, epoch=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) == 1 or len(b) * (max(src[b].max(), tgt[b].max()) + 1) <= 300
    again = token_batches(src, tgt, 300, seed=3, epoch=1)
    assert all((a == b).all() for a, b in zip(batches, again))  # deterministic (exact resume)
    other = token_batches(src, tgt, 300, seed=3, epoch=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other))


def test_collate_teacher_forcing_layout(reverse_data):
    train = DataDir(reverse_data).split("train")
    batch = collate(train, np.array([0, 1, 2]))
    for row, i in enumerate([0, 1, 2]):
        n = len(train.target(i))
        assert batch.tgt_in[row, 0] == BOS and batch.tgt_out[row, n] == EOS
        assert (batch.tgt_in[row, 1:n + 1] == batch.tgt_out[row, :n]).all()
        assert (batch.src[row, batch.src_lens[row]:] == PAD).all()
    assert batch.target_tokens == sum(len(train.target(i)) + 1 for i in [0, 1, 2])
