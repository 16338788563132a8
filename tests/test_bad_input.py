"""Bad input through the CLI: one clear error line naming the file/line/flag, never a traceback,
exit status 0 ok / 1 runtime failure / 2 usage error, stdout only data; and property tests that
translate returns one line per input line, in order, whatever the text.

Most cases run the typer app in-process (fast); broken pipes run a real process in a pipeline."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ROOT, reverse_pairs, write_parallel
from nmtkit.checkpoint import FORMAT_VERSION, LoadedModel
from nmtkit.cli import app
from nmtkit.translate import DecodeOptions, translate_lines

pytestmark = pytest.mark.usefixtures("single_thread")


def cli(*args, input: str | bytes | None = None):
    """Invoke `nmtkit ARGS` in-process; fail on any traceback (an exception that is not an exit)."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(result.exception)))
    assert "Traceback" not in result.stderr
    return result


def error_of(result, status: int) -> str:
    """The one error line (the last line of stderr); checks the exit status and an empty stdout."""
    assert result.exit_code == status, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert sum(": error: " in line for line in lines) == 1, result.stderr
    assert ": error: " in lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------- preprocess

@pytest.fixture
def corpus(tmp_path) -> Path:
    write_parallel(tmp_path / "train", reverse_pairs(60, 1))
    write_parallel(tmp_path / "valid", reverse_pairs(10, 2))
    return tmp_path


def preprocess(corpus: Path, *extra, train: str = "train"):
    return cli("preprocess", "--src", "src", "--tgt", "tgt", "--train", corpus / train, "--valid",
               corpus / "valid", "--out", corpus / "data", "--vocab-size", "40", "--model-type", "word", *extra)


def test_preprocess_line_count_mismatch(corpus):
    (corpus / "train.tgt").write_text("V1\n" * 59)
    line = error_of(preprocess(corpus), 1)
    assert line == (f"nmtkit preprocess: error: parallel files differ in length: {corpus}/train.src has 60 "
                    f"lines, {corpus}/train.tgt has 59")


def test_preprocess_filters_empty_and_overlong_lines_and_counts_them(corpus):
    pairs = reverse_pairs(60, 1)
    pairs[3], pairs[7] = ("", "V1"), ("w1 w2", "  ")
    pairs[11] = (" ".join(["w1"] * 150), "V1")
    write_parallel(corpus / "train", pairs)
    result = preprocess(corpus)
    assert result.exit_code == 0, result.stderr
    stats = json.loads((corpus / "data" / "manifest.json").read_text())["splits"]["train"]
    assert (stats["lines"], stats["kept"], stats["filtered_empty"], stats["filtered_too_long"]) == (60, 57, 2, 1)
    assert "train: kept 57 of 60 pairs (2 empty, 1 longer than 100 tokens)" in result.stderr


def test_preprocess_unicode_line_breaks_never_reach_the_vocabulary(corpus):
    pairs = [(s.replace(" ", "\x85", 1), t.replace(" ", "\u2028", 1)) for s, t in reverse_pairs(60, 1)]
    write_parallel(corpus / "train", pairs)
    assert preprocess(corpus).exit_code == 0
    from nmtkit.tokenizer import Tokenizer

    for side in ("src", "tgt"):
        pieces = Tokenizer((corpus / "data" / f"spm.{side}.model").read_bytes()).pieces()
        assert all(len(("x" + p + "x").splitlines()) == 1 for p in pieces), side


def test_preprocess_invalid_utf8(corpus):
    (corpus / "train.src").write_bytes(b"w1 w2\nw3 \xff w4\n" + b"w5\n" * 58)
    line = error_of(preprocess(corpus), 1)
    assert line == (f"nmtkit preprocess: error: {corpus}/train.src:2: invalid UTF-8 at byte 3 "
                    f"(fix the file or pass --errors replace)")
    assert preprocess(corpus, "--errors", "replace").exit_code == 0


def test_preprocess_missing_file_and_existing_output(corpus):
    line = error_of(preprocess(corpus, train="nope"), 1)
    assert line == f"nmtkit preprocess: error: file not found: {corpus}/nope.src (nor {corpus}/nope.src.gz)"
    assert preprocess(corpus).exit_code == 0
    line = error_of(preprocess(corpus), 2)
    assert line == f"nmtkit preprocess: error: {corpus}/data already holds preprocessed data; pass --force to overwrite it"
    assert preprocess(corpus, "--force").exit_code == 0


def test_preprocess_empty_training_text_and_file_as_output(corpus):
    (corpus / "train.src").write_text("\n" * 60)
    line = error_of(preprocess(corpus), 1)
    assert line == (f"nmtkit preprocess: error: {corpus}/train.src: no training text (the file is empty or "
                    f"holds only blank lines)")
    (corpus / "data").write_text("a file")
    assert error_of(preprocess(corpus), 2) == f"nmtkit preprocess: error: --out {corpus}/data is a file, not a directory"


# ----------------------------------------------------------------------------- train

TINY = ["--layers", "1", "--hidden-size", "16", "--embed-size", "8", "--batch-tokens", "2000",
        "--max-steps", "1", "--no-valid-bleu"]


def test_train_unknown_component_and_invalid_combination(reverse_data, tmp_path):
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", "--encoder", "transformer"), 2)
    assert line == "nmtkit train: error: unknown encoder 'transformer'; choose one of: rnn, birnn"
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", "--decoder", "none",
                        "--attention", "luong-dot"), 2)
    assert line.startswith("nmtkit train: error: decoder 'none' (RNNencdec) and attention 'none' go together")
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", "--update-freq", "0"), 2)
    assert line == "nmtkit train: error: train.update_freq (--update-freq) must be at least 1 (got 0)"
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", "--nproc", "0"), 2)
    assert line == "nmtkit train: error: --nproc must be at least 1 (got 0)"


def test_train_data_from_another_version_or_not_data(reverse_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(reverse_data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    line = error_of(cli("train", old, "--save", tmp_path / "r"), 1)
    assert line == (f"nmtkit train: error: {old}: data format version 99, this nmtkit reads version 1; "
                    f"run 'nmtkit preprocess' again")
    (old / "manifest.json").write_text("{not json")
    assert "corrupt manifest" in error_of(cli("train", old, "--save", tmp_path / "r"), 1)
    line = error_of(cli("train", tmp_path, "--save", tmp_path / "r"), 1)
    assert line == (f"nmtkit train: error: {tmp_path} is not a preprocessed data directory (no manifest.json); "
                    f"run 'nmtkit preprocess' first")


def test_train_out_of_disk(reverse_data, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", *TINY), 1)
    assert line == f"nmtkit train: error: cannot write checkpoint {tmp_path}/r/best.pt: No space left on device"
    assert [p.name for p in (tmp_path / "r").iterdir() if ".tmp" in p.name] == []


def test_train_existing_run_and_stdout_is_empty(reverse_data, tmp_path):
    result = cli("train", reverse_data, "--save", tmp_path / "r", *TINY)
    assert result.exit_code == 0 and result.stdout == ""
    line = error_of(cli("train", reverse_data, "--save", tmp_path / "r", *TINY), 2)
    assert line == (f"nmtkit train: error: {tmp_path}/r already holds a run (last.pt); pass --resume to continue "
                    f"it or choose another --save directory")


# ----------------------------------------------------------------------------- checkpoints

def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Evil:
    def __reduce__(self):
        return (_touch, (os.environ.get("NMTKIT_TEST_MARKER", "/nonexistent/marker"),))


def test_bad_checkpoints_for_translate_score_align(untrained_checkpoint, tmp_path, monkeypatch):
    good = untrained_checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "tensors.pt")
    marker = tmp_path / "marker"
    monkeypatch.setenv("NMTKIT_TEST_MARKER", str(marker))
    torch.save({"format_version": 1, "config": {}, "tokenizers": {}, "model": {}, "x": Evil()}, tmp_path / "evil.pt")
    torch.save({"format_version": FORMAT_VERSION + 1, "config": {}, "tokenizers": {}, "model": {}},
               tmp_path / "newer.pt")
    (tmp_path / "s.txt").write_text("w1 w2\n")
    expected = {
        "missing.pt": "checkpoint not found: {p}",
        "truncated.pt": "{p}: not a readable nmtkit checkpoint (truncated or corrupt: ",
        "random.pt": "{p}: not a readable nmtkit checkpoint (truncated or corrupt: ",
        "tensors.pt": "{p}: not an nmtkit checkpoint (it lacks format_version, config, tokenizers, model)",
        "evil.pt": "{p}: refused: holds a pickled Python object (test_bad_input._touch), not only tensors and "
                   "plain data; nmtkit loads checkpoints with weights_only=True",
        "newer.pt": f"{{p}}: checkpoint format {FORMAT_VERSION + 1} is newer than this nmtkit reads "
                    f"({FORMAT_VERSION}); upgrade nmtkit",
    }
    for name, message in expected.items():
        path = tmp_path / name
        for command in (["translate", "-m", path], ["align", "-m", path, "--src", tmp_path / "s.txt",
                                                     "--tgt", tmp_path / "s.txt"]):
            line = error_of(cli(*command, input="w1 w2\n"), 1)
            assert line.startswith(f"nmtkit {command[0]}: error: " + message.format(p=path)), line
    assert not marker.exists()


# ----------------------------------------------------------------------------- text streams

def test_align_and_score_line_count_mismatch(untrained_checkpoint, tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2\nw3\nw4\n")
    (tmp_path / "b.txt").write_text("V2 V1\nV3\n")
    line = error_of(cli("align", "-m", untrained_checkpoint, "--src", tmp_path / "a.txt",
                        "--tgt", tmp_path / "b.txt"), 1)
    assert line == f"nmtkit align: error: {tmp_path}/a.txt has 3 lines but {tmp_path}/b.txt has 2"
    line = error_of(cli("score", tmp_path / "a.txt", "--ref", tmp_path / "b.txt"), 1)
    assert line == f"nmtkit score: error: {tmp_path}/b.txt has 2 lines but {tmp_path}/a.txt has 3"


def test_translate_control_characters_invalid_utf8_and_long_lines(untrained_checkpoint, tmp_path):
    lines = [b"w1 \x00w2\x1b[31m w3", b"\x07\x08\x0b\x0c", b"w1\rw2", b"w1 \xe2\x80\xa8 w2", b"\xff\xfe w4",
             b" ".join([b"w1", b"w2", b"w3"] * 200), b"", b"   ", b"w5"]
    result = cli("translate", "-m", untrained_checkpoint, "--max-input-len", "8", "--max-len-ratio", "0.5",
                 input=b"\n".join(lines) + b"\n")
    assert result.exit_code == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)  # one line per input line, none split
    assert out[6] == "" and out[7] == ""
    assert "warning: stdin:5: invalid UTF-8 replaced by U+FFFD" in result.stderr


def test_translate_usage_and_output_errors(untrained_checkpoint, tmp_path):
    line = error_of(cli("translate", "-m", untrained_checkpoint, "--beam", "0", input="w1\n"), 2)
    assert line == "nmtkit translate: error: --beam, --batch-size, --max-input-len and --buffer-size must be at least 1"
    line = error_of(cli("translate", "-m", untrained_checkpoint, "-o", tmp_path / "no" / "out.txt", input="w1\n"), 1)
    assert line == f"nmtkit translate: error: cannot write {tmp_path}/no/out.txt: No such file or directory"
    line = error_of(cli("translate", "-m", untrained_checkpoint, "-i", tmp_path / "none.txt"), 1)
    assert line == f"nmtkit translate: error: input not found: {tmp_path}/none.txt"


def test_translate_into_closed_pipe_is_quiet(untrained_checkpoint, tmp_path):
    (tmp_path / "in.txt").write_text("w1 w2 w3\n" * 400)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = (f"set -o pipefail; '{sys.executable}' -m nmtkit translate -m '{untrained_checkpoint}' "
               f"--buffer-size 8 < '{tmp_path}/in.txt' 2> '{tmp_path}/err.txt' | head -1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1
    assert (tmp_path / "err.txt").read_text() == ""


# ----------------------------------------------------------------------------- properties

WORDS = [f"w{i}" for i in range(16)] + ["zz", "ü", "漢字"]
line_text = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=60)
huge_line = st.builds(lambda words, n: " ".join(words * n),
                      st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), st.integers(100, 500))
lines_strategy = st.lists(st.one_of(line_text, st.just(""), st.just("  \t "), huge_line,
                                    st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join)), max_size=8)


@pytest.fixture(scope="module")
def loaded(untrained_checkpoint) -> LoadedModel:
    return LoadedModel(untrained_checkpoint)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines_strategy, beam=st.sampled_from([1, 2]), buffer=st.sampled_from([1, 3, 64]))
def test_translate_lines_one_line_out_per_line_in(loaded, lines, beam, buffer):
    opts = DecodeOptions(beam=beam, batch_size=16, max_input_len=32, max_len_ratio=0.5, buffer_size=buffer)
    out = list(translate_lines(loaded, iter(lines), opts))
    assert len(out) == len(lines)
    for text, source in zip(out, lines):
        assert isinstance(text, str)
        assert len(text.splitlines()) <= 1 and "\n" not in text and "\r" not in text
        if not source.strip():
            assert text == ""
