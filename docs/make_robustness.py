"""Regenerate docs/robustness.md: run every bad input we know of through the real `nmtkit` CLI
(subprocesses, in a scratch directory with relative paths) and tabulate what the user sees.

    python docs/make_robustness.py            # writes docs/robustness.md (takes a few minutes)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "robustness.md"
HOOK = '''import errno, os
if os.environ.get("NMTKIT_SIMULATE_ENOSPC"):
    import torch
    def _full(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    torch.save = _full
'''
TINY = ("--layers 1 --hidden-size 16 --embed-size 8 --batch-tokens 2000 --max-steps 1 --no-valid-bleu")


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.randrange(16) for _ in range(rng.randint(3, 7))]
        out.append((" ".join(f"w{w}" for w in words), " ".join(f"V{w}" for w in reversed(words))))
    return out


def write(prefix: str, data: list[tuple[str, str]]) -> None:
    Path(f"{prefix}.src").write_text("".join(s + "\n" for s, _ in data))
    Path(f"{prefix}.tgt").write_text("".join(t + "\n" for _, t in data))


def sh(command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": f"{ROOT}:hook", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(["bash", "-c", "set -o pipefail; " + command], capture_output=True, text=True,
                          env=full, timeout=600)


def what_user_sees(stderr: str) -> str:
    if "╭─ Error" in stderr:  # typer/click usage error box
        inner = [line.strip("│ ").strip() for line in stderr.splitlines() if line.startswith("│")]
        return "usage box: " + " ".join(i for i in inner if i)
    keep = [line for line in stderr.splitlines()
            if any(k in line for k in ("error:", "warning:", "interrupted", "kept ", "resumed", "Traceback"))]
    return " ⏎ ".join(keep) if keep else "(nothing on stderr)"


def setup(work: Path) -> None:
    os.chdir(work)
    Path("hook").mkdir()
    Path("hook/sitecustomize.py").write_text(HOOK)
    Path("corpus").mkdir()
    write("corpus/train", pairs(200, 1))
    write("corpus/valid", pairs(20, 2))
    r = sh(f"python -m nmtkit preprocess --src src --tgt tgt --train corpus/train --valid corpus/valid "
           f"--out data --vocab-size 40 --model-type word")
    assert r.returncode == 0, r.stderr
    r = sh(f"python -m nmtkit train data --save run {TINY}")
    assert r.returncode == 0, r.stderr
    # bad inputs
    write("corpus/short", pairs(20, 3))
    Path("corpus/short.tgt").write_text("".join(t + "\n" for _, t in pairs(19, 3)))
    mixed = pairs(20, 4)
    mixed[2], mixed[5], mixed[9] = ("", "V1"), ("w1", "   "), (" ".join(["w1"] * 150), "V1")
    write("corpus/mixed", mixed)
    write("corpus/utf8", pairs(20, 5))
    Path("corpus/utf8.src").write_bytes(b"w1 w2\nw3 \xff w4\n" + b"w5\n" * 18)
    Path("corpus/empty.src").write_text("")
    Path("corpus/empty.tgt").write_text("")
    write("corpus/gz", pairs(5, 6))
    Path("corpus/gz.src").unlink()
    Path("corpus/gz.src.gz").write_bytes(b"this is not gzip data\n")
    Path("a_file").write_text("not a directory\n")
    shutil.copytree("data", "old-data")
    manifest = json.loads(Path("old-data/manifest.json").read_text())
    Path("old-data/manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    shutil.copytree("data", "broken-data")
    Path("broken-data/manifest.json").write_text("{not json")
    Path("recipe.yaml").write_text("model:\n  hidden_sise: 64\n")
    good = Path("run/best.pt").read_bytes()
    Path("truncated.pt").write_bytes(good[: len(good) // 2])
    Path("random.pt").write_bytes(random.Random(0).randbytes(4096))
    py = ("import torch; torch.save({'weights': torch.zeros(3)}, 'tensor.pt'); "
          "import os; torch.save({'format_version': 1, 'config': {}, 'tokenizers': {}, 'model': {}, "
          "'x': os.system}, 'pickled.pt'); "
          "torch.save({'format_version': 2, 'config': {}, 'tokenizers': {}, 'model': {}}, 'newer.pt')")
    assert sh(f"python -c \"{py}\"").returncode == 0
    Path("three.txt").write_text("w1 w2\nw3\nw4 w5\n")
    Path("two.txt").write_text("V2 V1\nV3\n")
    Path("control.txt").write_bytes(b"w1 \x00w2\x1b[31m w3\n\x07\x08\x0b\x0c\nw1\rw2\nw1 \xe2\x80\xa8 w2\n\n   \nw5\n")
    Path("badutf8.txt").write_bytes(b"w1 w2\n\xff\xfe w4\nw3\n")
    Path("long.txt").write_text(" ".join(["w1", "w2", "w3"] * 300) + "\nw4\n")
    Path("many.txt").write_text("w1 w2 w3\n" * 500)


P = "python -m nmtkit preprocess --src src --tgt tgt --valid corpus/valid --vocab-size 40 --model-type word"
CASES: list[tuple[str, str, str]] = [
    # (command, bad input, shell command)
    ("preprocess", "parallel files with different line counts", f"{P} --train corpus/short --out d1"),
    ("preprocess", "empty lines and overlong lines (filtered, counted in manifest.json)",
     f"{P} --train corpus/mixed --out d2"),
    ("preprocess", "invalid UTF-8", f"{P} --train corpus/utf8 --out d3"),
    ("preprocess", "invalid UTF-8 with --errors replace", f"{P} --train corpus/utf8 --out d4 --errors replace"),
    ("preprocess", "missing file", f"{P} --train corpus/nope --out d5"),
    ("preprocess", "corrupt .gz file", f"{P} --train corpus/gz --out d6"),
    ("preprocess", "empty training files", f"{P} --train corpus/empty --out d7"),
    ("preprocess", "output directory already holds data", f"{P} --train corpus/train --out data"),
    ("preprocess", "... with --force", f"{P} --train corpus/train --out d8 && {P} --train corpus/train --out d8 --force"),
    ("preprocess", "--out is a file", f"{P} --train corpus/train --out a_file"),
    ("preprocess", "unknown --model-type", f"{P} --train corpus/train --out d9 --model-type wordpiece"),
    ("train", "unknown encoder name", "python -m nmtkit train data --save r1 --encoder transformer"),
    ("train", "unknown attention name", "python -m nmtkit train data --save r1 --attention luong-cosine"),
    ("train", "invalid combination: decoder none with an attention",
     "python -m nmtkit train data --save r1 --decoder none --attention luong-dot"),
    ("train", "invalid combination: bridge backward without birnn",
     "python -m nmtkit train data --save r1 --encoder rnn --bridge backward"),
    ("train", "recipe with a misspelt key", "python -m nmtkit train data --save r1 --recipe recipe.yaml"),
    ("train", "malformed --set", "python -m nmtkit train data --save r1 --set hidden_size=64"),
    ("train", "data directory from another version (manifest format_version 99)",
     "python -m nmtkit train old-data --save r1"),
    ("train", "corrupt manifest.json", "python -m nmtkit train broken-data --save r1"),
    ("train", "not a data directory", "python -m nmtkit train corpus --save r1"),
    ("train", "--save holds a run, no --resume", f"python -m nmtkit train data --save run {TINY}"),
    ("train", "--resume with nothing to resume", f"python -m nmtkit train data --save r2 --resume"),
    ("train", "--resume with a different model flag", "python -m nmtkit train data --save run --resume --hidden-size 64"),
    ("train", "--update-freq 0", "python -m nmtkit train data --save r1 --update-freq 0"),
    ("train", "--nproc 0", "python -m nmtkit train data --save r1 --nproc 0"),
    ("train", "disk full (ENOSPC from torch.save, simulated)",
     f"NMTKIT_SIMULATE_ENOSPC=1 python -m nmtkit train data --save r3 {TINY}"),
    ("train", "disk full in a 2-process run (--nproc 2)",
     f"NMTKIT_SIMULATE_ENOSPC=1 python -m nmtkit train data --save r4 {TINY} --nproc 2"),
    ("translate", "checkpoint missing", "echo w1 | python -m nmtkit translate -m nope.pt"),
    ("translate", "checkpoint is a directory", "echo w1 | python -m nmtkit translate -m run"),
    ("translate", "truncated checkpoint", "echo w1 | python -m nmtkit translate -m truncated.pt"),
    ("translate", "random bytes", "echo w1 | python -m nmtkit translate -m random.pt"),
    ("translate", "a torch file that is not a checkpoint", "echo w1 | python -m nmtkit translate -m tensor.pt"),
    ("translate", "checkpoint with a pickled Python object (os.system)",
     "echo w1 | python -m nmtkit translate -m pickled.pt"),
    ("translate", "checkpoint from a newer format", "echo w1 | python -m nmtkit translate -m newer.pt"),
    ("align", "truncated checkpoint", "python -m nmtkit align -m truncated.pt --src three.txt --tgt three.txt"),
    ("translate", "--beam 0", "echo w1 | python -m nmtkit translate -m run/best.pt --beam 0"),
    ("translate", "no -m", "echo w1 | python -m nmtkit translate"),
    ("translate", "-o in a missing directory", "echo w1 | python -m nmtkit translate -m run/best.pt -o no/out.txt"),
    ("translate", "missing -i file", "python -m nmtkit translate -m run/best.pt -i none.txt"),
    ("translate", "control characters (NUL, ESC, BEL, VT, FF, CR, U+2028), blank lines",
     "python -m nmtkit translate -m run/best.pt < control.txt"),
    ("translate", "invalid UTF-8 in the input", "python -m nmtkit translate -m run/best.pt < badutf8.txt"),
    ("translate", "a 900-word line with --max-input-len 8",
     "python -m nmtkit translate -m run/best.pt --max-input-len 8 < long.txt"),
    ("translate", "stdout closed early (| head -1)",
     "python -m nmtkit translate -m run/best.pt --buffer-size 8 < many.txt | head -1"),
    ("align", "--src/--tgt with different line counts",
     "python -m nmtkit align -m run/best.pt --src three.txt --tgt two.txt"),
    ("align", "missing --src file", "python -m nmtkit align -m run/best.pt --src none.txt --tgt two.txt"),
    ("score", "hypotheses and reference with different line counts", "python -m nmtkit score three.txt --ref two.txt"),
    ("score", "unknown metric", "python -m nmtkit score three.txt --ref three.txt --metrics bleu,meteor"),
]


def lines_in(command: str) -> int | None:
    for name in ("control.txt", "badutf8.txt", "long.txt"):
        if name in command:
            return Path(name).read_bytes().count(b"\n")
    return None


def signal_case() -> tuple[str, str, str, int, str]:
    """SIGTERM while training: last.pt is written at the next update and the run can resume."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = ("python -m nmtkit train data --save r5 --layers 1 --hidden-size 16 --embed-size 8 "
               "--batch-tokens 400 --epochs 1000 --no-valid-bleu --set train.log_every=1")
    proc = subprocess.Popen([sys.executable, *command.split()[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 2:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return ("train", "SIGTERM during training (then `--resume` continues)", command + "  # then kill -TERM",
            proc.returncode, what_user_sees("".join(seen) + err))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="nmtkit-robustness-"))
    try:
        setup(work)
        rows = []
        for command, bad, shell in CASES:
            started = time.time()
            r = sh(shell)
            seen = what_user_sees(r.stderr)
            out_lines = len(r.stdout.splitlines())
            n_in = lines_in(shell)
            if n_in is not None:
                seen = f"{n_in} lines in, {out_lines} lines out; " + seen
            elif "head -1" in shell:
                seen = f"{out_lines} line on stdout; " + seen
            elif r.stdout and command in ("preprocess", "train"):
                seen = "stdout not empty! " + seen
            rows.append((command, bad, shell, r.returncode, seen))
            print(f"{r.returncode:>3} {time.time() - started:5.1f}s {command}: {bad}", file=sys.stderr)
        rows.append(signal_case())
        resumed = sh("python -m nmtkit train data --save r5 --resume --max-steps 4")
        rows.append(("train", "... `--resume` after the SIGTERM", "python -m nmtkit train data --save r5 --resume "
                     "--max-steps 4", resumed.returncode, what_user_sees(resumed.stderr)))
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    table = ["| command | bad input | exit | what the user sees (stderr; stdout stays data only) |",
             "|---|---|---|---|"]
    for command, bad, shell, code, seen in rows:
        table.append(f"| `{command}` | {esc(bad)}<br>`{esc(shell)}` | {code} | {esc(seen)} |")
    OUT.write_text(
        "# Robustness: bad input and what the user sees\n\n"
        "Generated by `python docs/make_robustness.py` from real runs of the CLI (a scratch directory, "
        "relative paths, a tiny model). Exit status: 0 ok, 1 runtime failure, 2 usage error; 130/143 "
        "after SIGINT/SIGTERM (last.pt written). Errors are one line naming the file, line or flag; "
        "no case prints a traceback. `⏎` separates stderr lines.\n\n" + "\n".join(table) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
