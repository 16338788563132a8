#!/usr/bin/env python3
"""nmtkit and OpenNMT-py 3.5.1 side by side on the reference model, one command:

    bash bench/onmt_setup.sh                    # once: OpenNMT-py in runs/bench/onmt-venv
    .venv/bin/python bench/side_by_side.py      # [--rounds 3] [--steps 200] [--no-onmt] [--skip-translate]

Reference model (both toolkits): 2-layer biLSTM encoder (2 x 256), 2-layer LSTM decoder 512 that
starts from the encoder's final states (nmtkit bridge 'last', OpenNMT-py's default: no bridge),
embeddings 512, Luong 'general' global attention with input feeding, dropout 0.3, word
vocabularies of 10k per side, Adam 1e-3, batches of 64 sentences (length-bucketed in both),
data ../shared/data/wmt14-toy (linked as runs/bench/raw/{train,val,test}.{en,de}).

Every figure is the median of --rounds rounds; within a round all runs are interleaved so that
the ratios compare runs taken under the same machine load (1-minute load average printed with
each figure). Training throughput is target tokens (non-padding, with EOS, as both toolkits
count them) per second over steps 21..--steps from each toolkit's own log; model FLOP utilisation is
tokens/s x FLOPs per token (counted below) / a 2048^3 matmul's FLOP/s measured in the same round.
Translation: the first 500 test sentences, batch 32, greedy and beam 5, natural length and forced
to exactly 23 output tokens; whole-process wall time and peak RSS from /usr/bin/time -v;
throughput = 500 / (wall time - wall time of translating one sentence), so start-up and model
loading are excluded; start-up = wall time of translating one sentence.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "bench"
DATA = RUNS / "data"
NMTKIT = str(ROOT / ".venv" / "bin" / "nmtkit")
ONMT_BIN = RUNS / "onmt-venv" / "bin"
RAW = (ROOT / ".." / "shared" / "data" / "wmt14-toy").resolve()
E = H = 512
V = 10_000

MODEL_FLAGS = ["--encoder", "birnn", "--decoder", "luong", "--attention", "luong-general", "--window", "global",
               "--rnn", "lstm", "--layers", "2", "--hidden-size", str(H), "--embed-size", str(E),
               "--dropout", "0.3", "--input-feed", "--bridge", "last"]

ONMT_CONFIG = """\
save_data: {run}/onmt/data
src_vocab: {run}/onmt/vocab.src
tgt_vocab: {run}/onmt/vocab.tgt
src_vocab_size: 10000
tgt_vocab_size: 10000
overwrite: true
data:
  corpus_1:
    path_src: {run}/raw/train.en
    path_tgt: {run}/raw/train.de
  valid:
    path_src: {run}/raw/val500.en
    path_tgt: {run}/raw/val500.de
encoder_type: brnn
decoder_type: rnn
rnn_type: LSTM
layers: 2
hidden_size: 512
word_vec_size: 512
global_attention: general
input_feed: 1
dropout: 0.3
optim: adam
learning_rate: 0.001
max_grad_norm: 5
batch_type: sents
batch_size: 64
valid_batch_size: 64
num_workers: 0
seed: 1
report_every: 10
valid_steps: 1000000
save_checkpoint_steps: {steps}
train_steps: {steps}
"""


def load() -> float:
    return os.getloadavg()[0]


def run(cmd: list[str], log: Path, env: dict | None = None, stdin: Path | None = None,
        stdout: Path | None = None) -> dict:
    """Run under /usr/bin/time -v; returns wall seconds, peak RSS (MiB) and the load before."""
    before = load()
    full = ["/usr/bin/time", "-v", *cmd]
    with open(log, "w") as err, open(stdout or os.devnull, "w") as out, \
            open(stdin or os.devnull) as inp:
        start = time.perf_counter()
        proc = subprocess.run(full, stdin=inp, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return {"wall": wall, "rss_mib": rss, "load": before}


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 7) -> dict[str, float]:
    """GFLOP/s of an n^3 matmul on this process's threads (median of reps), the better of torch's
    own ``a @ b`` (MKL's sgemm in fp32) and oneDNN's matmul with a pre-packed weight (what
    nmtkit's fp32 linears use): on AMD CPUs MKL reaches only ~70 % of what oneDNN does, and an MFU
    against the slower of the two would flatter everybody."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)

    def gflops(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / statistics.median(times) / 1e9

    result = {"mm": gflops(lambda: a @ b)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        result["onednn"] = gflops(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    except (AttributeError, RuntimeError):
        pass
    result["gflops"] = max(result.values())
    return result


def flops_per_target_token(src_per_tgt: float, src_len: float) -> dict[str, float]:
    """Multiply-adds x 2 of the reference model per target token (forward), by part; training = x3.

    Decoder per target token: embedding projection 2·E·4H; layer 0 [feed; h] 2·2H·4H; layer 1
    [h_below; h] 2·2H·4H; attention scores and context 2·S·H each; W_c 2·2H·H; generator 2·H·V.
    Encoder per source token and layer: two directions of 2·(in + H/2)·4·(H/2); keys W_a h̄_s
    2·H·H. Source tokens per target token from the data. Bridge, softmaxes, pointwise: not counted.
    """
    dec = 2 * E * 4 * H + 2 * (2 * 2 * H * 4 * H) + 2 * 2 * src_len * H + 2 * 2 * H * H + 2 * H * V
    h = H // 2
    enc = 2 * (2 * (E + h) * 4 * h) + 2 * (2 * (H + h) * 4 * h) + 2 * H * H
    fwd = dec + src_per_tgt * enc
    return {"decoder": dec, "encoder": src_per_tgt * enc, "forward": fwd, "train": 3 * fwd}


# ----------------------------------------------------------------------------- set-up

def setup(onmt: bool, steps: int) -> None:
    raw = RUNS / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        for lang, side in (("en", "src"), ("de", "tgt")):
            link = raw / f"{split}.{lang}"
            if not link.exists():
                link.symlink_to(RAW / f"{side}-{split}.txt")
    for lang in ("en", "de"):  # a 500-pair validation set: nmtkit validates once, at the end
        lines = (raw / f"val.{lang}").read_text(encoding="utf-8").splitlines()[:500]
        (raw / f"val500.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if not (DATA / "manifest.json").exists():
        subprocess.run([NMTKIT, "preprocess", "--src", "en", "--tgt", "de", "--train", str(raw / "train"),
                        "--valid", str(raw / "val500"), "--model-type", "word", "--vocab-size", str(V),
                        "--separate", "--out", str(DATA)], check=True)
    lines = (raw / "test.en").read_text(encoding="utf-8").splitlines()
    (RUNS / "test500.en").write_text("".join(line + "\n" for line in lines[:500]), encoding="utf-8")
    (RUNS / "test1.en").write_text(lines[0] + "\n", encoding="utf-8")
    if onmt:
        (RUNS / "onmt").mkdir(exist_ok=True)
        cfg = RUNS / "onmt" / "config.yaml"
        cfg.write_text(ONMT_CONFIG.format(run=RUNS, steps=steps))
        if not (RUNS / "onmt" / "vocab.tgt").exists():
            subprocess.run([str(ONMT_BIN / "onmt_build_vocab"), "-config", str(cfg), "-n_sample", "-1"],
                           check=True, env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})


def padding_report() -> dict[str, float]:
    """Padding of nmtkit's length-bucketed 64-sentence batches (one epoch)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from nmtkit.data import DataDir, token_batches

    data = DataDir(DATA).split("train")
    batches = token_batches(data.src_lens, data.tgt_lens, 10**9, seed=1, max_sents=64)
    real_src = real_tgt = pad_src = pad_tgt = 0
    for b in batches:
        s, t = data.src_lens[b], data.tgt_lens[b] + 1
        real_src, real_tgt = real_src + int(s.sum()), real_tgt + int(t.sum())
        pad_src, pad_tgt = pad_src + len(b) * int(s.max()), pad_tgt + len(b) * int(t.max())
    return {"batches": len(batches), "src_padding": 1 - real_src / pad_src, "tgt_padding": 1 - real_tgt / pad_tgt,
            "src_per_tgt": float(np.sum(data.src_lens)) / (float(np.sum(data.tgt_lens)) + len(data.tgt_lens)),
            "src_len": float(np.mean(data.src_lens))}


# ----------------------------------------------------------------------------- training

def train_nmtkit(precision: str, steps: int, tag: str) -> dict:
    save = RUNS / f"nmtkit-{precision}-{tag}"
    shutil.rmtree(save, ignore_errors=True)
    cmd = [NMTKIT, "train", str(DATA), "--save", str(save), *MODEL_FLAGS, "--optimizer", "adam", "--lr", "0.001",
           "--batch-tokens", "1000000", "--batch-sents", "64", "--max-steps", str(steps), "--epochs", "1000",
           "--no-valid-bleu", "--precision", precision, "--set", "train.log_every=10"]
    result = run(cmd, RUNS / f"nmtkit-{precision}-{tag}.log")
    return {**result, **nmtkit_windows(save, steps), "model": str(save / "best.pt")}


def nmtkit_windows(save: Path, steps: int) -> dict:
    """tokens/s over steps 21..steps, and the median of the 10-step windows' tokens/s."""
    windows = []
    for line in (save / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "train" and 20 < rec["step"] <= steps:
            windows.append((rec["tokens"], rec["seconds"]))
    return summarise(windows)


def summarise(windows: list[tuple[float, float]]) -> dict:
    tokens, seconds = sum(t for t, _ in windows), sum(s for _, s in windows)
    return {"tok_s": tokens / seconds, "tok_s_window_median": median([t / s for t, s in windows])}


STEP = re.compile(r"Step\s+(\d+)/\s*\d+;.*?bsz:\s*[\d.]+/\s*([\d.]+)/\s*[\d.]+;\s*[\d.]+/\s*([\d.]+) tok/s")


def train_onmt(steps: int, tag: str) -> dict:
    save = RUNS / f"onmt-{tag}"
    shutil.rmtree(save, ignore_errors=True)
    save.mkdir()
    log = RUNS / f"onmt-{tag}.log"
    cmd = [str(ONMT_BIN / "onmt_train"), "-config", str(RUNS / "onmt" / "config.yaml"),
           "-save_model", str(save / "model")]
    result = run(cmd, log, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    return {**result, **onmt_windows(log, steps), "model": str(save / f"model_step_{steps}.pt")}


def last_onmt_checkpoint(run: Path) -> str:
    """The OpenNMT-py checkpoint of the most steps in ``run`` (--skip-train reuses it whatever
    --steps the training run had)."""
    saved = sorted(run.glob("model_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not saved:
        raise SystemExit(f"--skip-train: no OpenNMT-py checkpoint (model_step_N.pt) in {run}; run without it first")
    return str(saved[-1])


def onmt_windows(log: Path, steps: int) -> dict:
    windows = []
    for m in STEP.finditer(log.read_text(errors="replace")):
        step, per_batch, tok_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
        if 20 < step <= steps:
            tokens = per_batch * 10  # report_every 10 batches; bsz = target tokens per batch
            windows.append((tokens, tokens / tok_s))
    if not windows:
        raise SystemExit(f"no step lines parsed in {log}")
    return summarise(windows)


# ----------------------------------------------------------------------------- translation

def translate_nmtkit(model: str, src: Path, out: Path, beam: int, forced: bool, precision="fp32",
                     quantize="none") -> dict:
    cmd = [NMTKIT, "translate", "-m", model, "-i", str(src), "-o", str(out), "--beam", str(beam),
           "--batch-size", "32", "--precision", precision, "--quantize", quantize]
    if forced:
        cmd += ["--min-len", "23", "--max-len", "23"]
    return run(cmd, out.with_suffix(".log"))


def translate_onmt(model: str, src: Path, out: Path, beam: int, forced: bool) -> dict:
    cmd = [str(ONMT_BIN / "onmt_translate"), "-model", model, "-src", str(src), "-output", str(out),
           "-beam_size", str(beam), "-batch_size", "32", "-batch_type", "sents", "-max_length_ratio", "0",
           "-gpu", "-1"]
    if forced:
        cmd += ["-min_length", "23", "-max_length", "23"]
    return run(cmd, out.with_suffix(".log"), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})


def out_tokens(path: Path) -> int:
    return sum(len(line.split()) for line in path.read_text(encoding="utf-8").splitlines())


# ----------------------------------------------------------------------------- main

def median(values):
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no-onmt", action="store_true", help="nmtkit only")
    ap.add_argument("--skip-train", action="store_true", help="reuse the round-1 models of a previous run")
    ap.add_argument("--skip-translate", action="store_true", help="training figures only")
    ap.add_argument("--report-only", action="store_true", help="print the tables of runs/bench/results.json again")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every run and the matmul peak (0: the toolkits' default, all cores)")
    args = ap.parse_args()
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    onmt = not args.no_onmt
    if args.report_only:
        saved = json.loads((RUNS / "results.json").read_text())
        results = saved["results"]
        for key, runs_ in results.items():  # window medians from the logs (older result files lack them)
            for r, res in enumerate(runs_, 1):
                if key.startswith("train_nmtkit_"):
                    res.update(nmtkit_windows(RUNS / f"nmtkit-{key.rsplit('_', 1)[1]}-r{r}", args.steps))
                elif key == "train_onmt_fp32":
                    res.update(onmt_windows(RUNS / f"onmt-r{r}.log", args.steps))
        report(results, saved["padding"], saved["flops"], "train_onmt_fp32" in results or "onmt_fp32_none_beam1_natural" in results,
               args.steps)
        return
    setup(onmt, args.steps)
    pad = padding_report()
    flops = flops_per_target_token(pad["src_per_tgt"], pad["src_len"])
    results: dict[str, list] = {}

    def add(key, value):
        results.setdefault(key, []).append(value)
        print(f"  {key}: {json.dumps(value)}", file=sys.stderr, flush=True)

    models = {}
    for r in range(1, args.rounds + 1):
        tag = f"r{r}"
        print(f"round {r}", file=sys.stderr, flush=True)
        add("peak_fp32", {**matmul_peak("fp32"), "load": load()})
        add("peak_bf16", {**matmul_peak("bf16"), "load": load()})
        if not args.skip_train:
            for precision in ("fp32", "bf16"):
                res = train_nmtkit(precision, args.steps, tag)
                add(f"train_nmtkit_{precision}", res)
                models.setdefault(f"nmtkit_{precision}", res["model"])
            if onmt:
                res = train_onmt(args.steps, tag)
                add("train_onmt_fp32", res)
                models.setdefault("onmt", res["model"])
        else:
            models = {"nmtkit_fp32": str(RUNS / "nmtkit-fp32-r1" / "best.pt")}
            if onmt:
                models["onmt"] = last_onmt_checkpoint(RUNS / "onmt-r1")
        if args.skip_translate:
            save(results, pad, flops)
            continue
        out = RUNS / "out"
        out.mkdir(exist_ok=True)
        nm = models["nmtkit_fp32"]
        runs = [("nmtkit", "fp32", "none", 1, False), ("nmtkit", "fp32", "none", 5, False),
                ("nmtkit", "fp32", "none", 1, True), ("nmtkit", "fp32", "none", 5, True),
                ("nmtkit", "bf16", "none", 5, True), ("nmtkit", "fp32", "int8", 5, True),
                ("nmtkit", "bf16", "none", 1, True), ("nmtkit", "fp32", "int8", 1, True)]
        if onmt:
            runs += [("onmt", "fp32", "none", 1, False), ("onmt", "fp32", "none", 5, False),
                     ("onmt", "fp32", "none", 1, True), ("onmt", "fp32", "none", 5, True)]
        startup = {}
        for kit in ("nmtkit", "onmt") if onmt else ("nmtkit",):
            o = out / f"{kit}-one.txt"
            one = (lambda: translate_nmtkit(nm, RUNS / "test1.en", o, 1, False)) if kit == "nmtkit" else (
                lambda: translate_onmt(models["onmt"], RUNS / "test1.en", o, 1, False))
            one()  # untimed: a start that reads the toolkit from disk, not the page cache (19.6 s for
            res = one()  # OpenNMT-py after --skip-train; the VM drops its page cache between rounds)
            startup[kit] = res["wall"]
            add(f"startup_{kit}", res)
        for kit, precision, quantize, beam, forced in runs:
            name = f"{kit}_{precision}_{quantize}_beam{beam}_{'forced23' if forced else 'natural'}"
            o = out / f"{name}.txt"
            if kit == "nmtkit":
                res = translate_nmtkit(nm, RUNS / "test500.en", o, beam, forced, precision, quantize)
            else:
                res = translate_onmt(models["onmt"], RUNS / "test500.en", o, beam, forced)
            net = max(res["wall"] - startup[kit], 1e-6)
            tokens = out_tokens(o)
            add(name, {**res, "sent_s": 500 / net, "tok_s": tokens / net, "out_tokens": tokens})
        save(results, pad, flops)
    report(results, pad, flops, onmt, args.steps)


def save(results, pad, flops) -> None:
    """Raw figures so far to runs/bench/results.json (after every round: a cut-short run keeps them)."""
    (RUNS / "results.json").write_text(json.dumps({"results": results, "padding": pad, "flops": flops}, indent=1))


def report(results, pad, flops, onmt, steps: int) -> None:
    med = lambda key, field: median([r[field] for r in results.get(key, [])])  # noqa: E731
    loads = lambda key: "/".join(f"{r['load']:.1f}" for r in results.get(key, []))  # noqa: E731
    peak32, peak16 = med("peak_fp32", "gflops"), med("peak_bf16", "gflops")
    print(f"Matmul peak (2048³, {os.environ.get('OMP_NUM_THREADS', os.cpu_count())} threads, the better of torch's a @ b and "
          f"oneDNN's packed matmul): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s (loads {loads('peak_fp32')})")
    for which in ("fp32", "bf16"):
        runs = results.get(f"peak_{which}", [])
        if runs and "onednn" in runs[0]:
            print(f"  {which}: a @ b {med(f'peak_{which}', 'mm'):.0f}, oneDNN {med(f'peak_{which}', 'onednn'):.0f} GFLOP/s")
    print()
    print(f"FLOPs per target token (training = 3 x forward): {flops['train'] / 1e6:.1f} M "
          f"(forward: decoder {flops['decoder'] / 1e6:.1f} M + encoder {flops['encoder'] / 1e6:.1f} M)\n")
    print(f"Padding of 64-sentence length-bucketed batches: source {pad['src_padding']:.1%}, "
          f"target {pad['tgt_padding']:.1%} ({pad['batches']} batches)\n")
    print(f"| training (steps 21-{steps}) | tokens/s | MFU | ÷ OpenNMT-py | median 10-step window tokens/s | MFU | ÷ OpenNMT-py | peak RSS MiB | loads |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = med("train_onmt_fp32", "tok_s") if onmt else float("nan")
    base_w = med("train_onmt_fp32", "tok_s_window_median") if onmt else float("nan")
    for key, label, peak in (("train_nmtkit_fp32", "nmtkit fp32", peak32), ("train_nmtkit_bf16", "nmtkit bf16", peak16),
                             ("train_onmt_fp32", "OpenNMT-py 3.5.1 fp32", peak32)):
        if key not in results:
            continue
        tok, tok_w = med(key, "tok_s"), med(key, "tok_s_window_median")
        which = "bf16" if "bf16" in key else "fp32"
        mfu, mfu_w = (x * flops["train"] / (peak * 1e9) for x in (tok, tok_w))
        print(f"| {label} | {tok:.0f} | {mfu:.0%} of {which} peak | {tok / base:.2f} | {tok_w:.0f} | {mfu_w:.0%} | "
              f"{tok_w / base_w:.2f} | {med(key, 'rss_mib'):.0f} | {loads(key)} |")
    # throughput net of start-up: each run's wall time minus the MEDIAN start-up of its toolkit
    # (a single round's start-up can be an outlier: page cache evicted by other jobs)
    startup = {kit: med(f"startup_{kit}", "wall") for kit in ("nmtkit", "onmt") if f"startup_{kit}" in results}
    for key, runs_ in results.items():
        kit = key.split("_", 1)[0]
        if kit in startup and not key.startswith("startup_"):
            for res in runs_:
                net = max(res["wall"] - startup[kit], 1e-6)
                res["sent_s"], res["tok_s"] = 500 / net, res["out_tokens"] / net
    # sent/s subtracts each toolkit's start-up, measured in other runs: OpenNMT-py's swings by a second
    # here, and its net time is ~3 s. The ratio of whole-process walls needs no subtraction.
    print("\n| translation, 500 sentences, batch 32 | sent/s | out tokens/s | wall s | peak RSS MiB "
          "| ÷ OpenNMT-py sent/s | OpenNMT-py wall ÷ wall | loads |")
    print("|---|---|---|---|---|---|---|---|")
    for key in results:
        if not key.startswith(("nmtkit_", "onmt_")):
            continue
        onmt_key = re.sub(r"^(nmtkit|onmt)_(fp32|bf16)_(none|int8)_", "onmt_fp32_none_", key)
        both = onmt and onmt_key in results
        ratio = med(key, "sent_s") / med(onmt_key, "sent_s") if both else float("nan")
        wall_ratio = med(onmt_key, "wall") / med(key, "wall") if both else float("nan")
        print(f"| {key} | {med(key, 'sent_s'):.1f} | {med(key, 'tok_s'):.0f} | {med(key, 'wall'):.1f} | "
              f"{med(key, 'rss_mib'):.0f} | {ratio:.2f} | {wall_ratio:.2f} | {loads(key)} |")
    print("\n| start-up: translate one sentence | wall s | peak RSS MiB | loads |")
    print("|---|---|---|---|")
    for kit in ("nmtkit", "onmt"):
        key = f"startup_{kit}"
        if key in results:
            print(f"| {kit} | {med(key, 'wall'):.2f} | {med(key, 'rss_mib'):.0f} | {loads(key)} |")


if __name__ == "__main__":
    main()
