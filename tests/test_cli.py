"""The command line end to end, as a user runs it: preprocess -> train -> translate -> score -> align."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, reverse_pairs, run_cli


@pytest.fixture(scope="module")
def cli_run(reverse_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, model = root / "data", root / "model"
    run_cli("preprocess", "--src", "src", "--tgt", "tgt", "--train", str(reverse_corpus / "train"),
            "--valid", str(reverse_corpus / "valid"), "--vocab-size", "40", "--model-type", "word",
            "--separate", "--out", str(data))
    result = run_cli("train", str(data), "--save", str(model), "--layers", "1", "--hidden-size", "32",
                     "--embed-size", "16", "--max-steps", "20", "--batch-tokens", "600", "--attention",
                     "luong-dot", "--rnn", "gru", "--no-valid-bleu")
    assert result.stdout == ""  # logs go to stderr
    return root


def test_pipeline(cli_run, reverse_corpus):
    model = str(cli_run / "model" / "best.pt")
    src_lines = (reverse_corpus / "test.src").read_text().splitlines()[:20]
    text = "\n".join(src_lines[:10] + ["", "  "] + src_lines[10:]) + "\n"
    hyp = run_cli("translate", "-m", model, "--beam", "3", input=text)
    lines = hyp.stdout.split("\n")[:-1]
    assert len(lines) == 22 and lines[10] == "" and lines[11] == ""

    ref = reverse_corpus / "test.tgt"
    refs = ref.read_text().splitlines()[:20]
    ref20 = cli_run / "ref.txt"
    ref20.write_text("\n".join(refs[:10] + ["", ""] + refs[10:]) + "\n")
    scored = json.loads(run_cli("score", "--ref", str(ref20), "--json", input=hyp.stdout).stdout)
    assert set(scored) == {"BLEU", "chrF2", "TER"} and 0 <= scored["BLEU"]["score"] < 100
    perfect = run_cli("score", "--ref", str(ref20), "--metrics", "bleu", str(ref20))  # hypothesis file
    assert perfect.stdout.startswith("BLEU = 100.00") and "nrefs:1" in perfect.stdout

    pairs = reverse_pairs(5, seed=9)
    src, tgt = cli_run / "a.src", cli_run / "a.tgt"
    src.write_text("".join(s + "\n" for s, _ in pairs))
    tgt.write_text("".join(t + "\n" for _, t in pairs))
    aligned = run_cli("align", "-m", model, "--src", str(src), "--tgt", str(tgt)).stdout.splitlines()
    assert len(aligned) == 5
    for line, (_, t) in zip(aligned, pairs):
        links = [tuple(map(int, x.split("-"))) for x in line.split()]
        assert sorted(j for _, j in links) == list(range(len(t.split())))


def test_every_buffered_line_reaches_the_pipe(cli_run, reverse_corpus, tmp_path):
    """main() leaves by os._exit (no interpreter teardown, issue 4's start-up): what translate wrote
    to the block-buffered stdout pipe must still be flushed out, to the last line."""
    src_lines = (reverse_corpus / "test.src").read_text().splitlines()
    text = "".join(f"{src_lines[i % len(src_lines)]}\n" for i in range(1500))
    model = str(cli_run / "model" / "best.pt")
    piped = run_cli("translate", "-m", model, "--beam", "1", "--max-len", "12", input=text).stdout
    assert piped.count("\n") == 1500 and piped.endswith("\n")
    (tmp_path / "in.txt").write_text(text)
    run_cli("translate", "-m", model, "--beam", "1", "--max-len", "12", "-i", str(tmp_path / "in.txt"),
            "-o", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == piped


def test_translate_file_options(cli_run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2 w3\n\nw4 w5 w6\n")
    out = tmp_path / "out.txt"
    run_cli("translate", "-m", str(cli_run / "model" / "best.pt"), "-i", str(src), "-o", str(out))
    assert len(out.read_text().split("\n")) == 4 and out.read_text().split("\n")[1] == ""


def test_help_lists_registered_names():
    text = run_cli("train", "--help").stdout
    for name in ("birnn", "bahdanau", "luong-general", "luong-location", "local-p"):
        assert name in text


def test_exit_codes_and_one_line_errors(cli_run, tmp_path):
    missing = run_cli("translate", "-m", str(tmp_path / "nope.pt"), input="x\n", check=False)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""
    bad = run_cli("train", str(cli_run / "data"), "--save", str(tmp_path / "m"), "--attention", "cosine",
                  check=False)
    assert bad.returncode == 2 and "unknown attention 'cosine'; choose one of" in bad.stderr
    combo = run_cli("train", str(cli_run / "data"), "--save", str(tmp_path / "m"), "--attention", "none",
                    check=False)
    assert combo.returncode == 2 and "go together" in combo.stderr


def test_translate_imports_nothing_it_does_not_need(trained_reverse):
    """Start-up: one sentence through `nmtkit translate` imports no pydantic (typer 0.29 builds a
    pydantic adapter per option: ~0.1 s), no yaml (recipes are a training matter) and no
    torch._dynamo, and still translates."""
    code = ("import atexit, sys; from nmtkit.cli import main; sys.argv = ['nmtkit', *sys.argv[1:]]\n"
            "heavy = ('pydantic', 'yaml', 'torch._dynamo')\n"
            "atexit.register(lambda: print('loaded:', *[m for m in heavy if m in sys.modules], flush=True))\n"
            "main()")
    out = subprocess.run([sys.executable, "-c", code, "translate", "-m", str(trained_reverse / "best.pt")],
                         input="w3 w7 w1\n", capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    assert len(out) == 2 and out[0].startswith("V")
    assert out[1] == "loaded:"
