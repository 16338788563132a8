#!/usr/bin/env python3
"""How much of a training step (or of translation) is matrix products, measured without the
profiler, and so how fast it could at most be if everything else took no time.

    python bench/matmul_share.py train [--precision fp32|bf16] [--steps 12]
    python bench/matmul_share.py translate -m runs/bench/nmtkit-fp32-r1/best.pt [--beam 5] [--precision fp32]

torch.profiler slows these runs by a third to a half (bf16 training: 1850 -> 1210 tokens/s on the
benchmark machine) and charges part of that to single ops, so its percentages mislead. Here the
work is timed plainly (best of two passes); then the same work runs once more under a dispatch
mode that only counts every matrix product by (op, shapes, strides) and keeps one example of its
arguments; each distinct product is then re-timed alone (median of 5) and multiplied by its count.
``bound`` = the work's size ÷ the summed product time: the throughput with zero non-product time.
Translation's encoder runs torch's nn.LSTM, one op per layer stack whose products happen inside:
such calls are counted whole, as products (so the bound is, if anything, low).
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nmtkit.data import DataDir, collate, token_batches
from nmtkit.model import build_model
from nmtkit.train import make_optimizer, prepare_config
from nmtkit.translate import autocast, translate_ids
from profile_train import reference_config
from profile_translate import prepared_translation

PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_linear_pointwise", "linear", "linear_dynamic",
            "lstm", "gru", "quantized_lstm", "quantized_gru"}  # whole nn.LSTM/GRU calls: products inside


def _signature(arg):
    """Hashable description: (shape, dtype, strides) per tensor, also inside lists (nn.LSTM's weights)."""
    if isinstance(arg, torch.Tensor):
        strides = arg.stride() if arg.layout == torch.strided and not arg.is_mkldnn else None
        return tuple(arg.shape), arg.dtype, strides
    if isinstance(arg, (list, tuple)):
        return tuple(_signature(a) for a in arg)
    if isinstance(arg, torch.ScriptObject):  # int8 packed weights: a new wrapper at every call
        try:
            return "packed", tuple(torch.ops.quantized.linear_unpack(arg)[0].shape)
        except RuntimeError:  # not a linear's (an LSTM cell's): not grouped
            return "packed", id(arg)
    return repr(arg)


def _shapes(sig) -> str:
    """The shapes in a ``_signature``, for the table."""
    if isinstance(sig, tuple) and len(sig) == 3 and isinstance(sig[1], torch.dtype):
        return str(sig[0])
    if isinstance(sig, tuple) and sig and sig[0] == "packed":
        return f"int8 {sig[1]}" if isinstance(sig[1], tuple) else "int8"
    if isinstance(sig, tuple):
        return f"[{len(sig)} tensors]" if len(sig) > 4 else "[" + ", ".join(_shapes(s) for s in sig) + "]"
    return sig


def _keep(arg):
    if isinstance(arg, torch.Tensor) and arg.layout == torch.strided and not arg.is_mkldnn:
        return arg.detach().clone()
    if isinstance(arg, (list, tuple)):
        return type(arg)(_keep(a) for a in arg)
    return arg  # packed (oneDNN-blocked) weights, scalars, strings: as they are


class CountProducts(TorchDispatchMode):
    """Counts every matrix product by (op, argument shapes/strides); keeps one example each."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()
        self.example: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in PRODUCTS:
            key = (str(func), tuple(_signature(a) for a in args))
            self.count[key] += 1
            if key not in self.example:
                self.example[key] = (func, [_keep(a) for a in args], kwargs or {})
        return func(*args, **(kwargs or {}))


def median_seconds(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def measure(work: Callable[[], float], unit: str, top: int) -> None:
    """``work()`` does the job once and returns its size (tokens or sentences)."""
    plain, size = [], 0.0
    for _ in range(2):
        start = time.perf_counter()
        size = work()
        plain.append(time.perf_counter() - start)
    counter = CountProducts()
    with counter:
        work()
    rows = []
    for key, n in counter.count.items():
        func, args, kwargs = counter.example[key]
        with torch.inference_mode():
            seconds = median_seconds(lambda: func(*args, **kwargs))
        rows.append((n * seconds, n, seconds, key))
    products = sum(r[0] for r in rows)
    best = min(plain)
    print(f"{size:.0f} {unit} in {best:.2f} s (best of 2): {size / best:.0f} {unit}/s")
    print(f"matrix products, re-timed alone: {products:.2f} s = {products / best:.0%} of that time")
    print(f"bound with zero non-product time: {size / products:.0f} {unit}/s ({best / products:.2f}x now)")
    print("\n| time (ms) | calls | ms each | op | argument shapes |\n|---:|---:|---:|---|---|")
    for total, n, seconds, (op, sig) in sorted(rows, key=lambda r: -r[0])[:top]:
        shapes = ", ".join(_shapes(s) for s in sig)
        print(f"| {total * 1e3:.0f} | {n} | {seconds * 1e3:.3f} | {op} | {shapes} |")


def train_work(args) -> Callable[[], float]:
    torch.manual_seed(1)
    data = DataDir(args.data)
    config = prepare_config(reference_config(), data)
    model = build_model(config.model)
    opt = make_optimizer(model, config)
    train = data.split("train")
    batches = token_batches(train.src_lens, train.tgt_lens, 1_000_000, seed=1, max_sents=64)
    model.train()

    def step(idx) -> int:
        batch = collate(train, idx)
        opt.zero_grad(set_to_none=True)
        with autocast(args.precision):
            loss, _ = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
        (loss / batch.target_tokens).backward()
        opt.step()
        return batch.target_tokens

    for idx in batches[:args.warmup]:
        step(idx)
    chosen = batches[args.warmup:args.warmup + args.steps]
    return lambda: float(sum(step(idx) for idx in chosen))


def translate_work(args) -> Callable[[], float]:
    model, sources, opts = prepared_translation(args)
    return lambda: float(len(translate_ids(model, sources, opts)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", choices=["train", "translate"])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10, help="products listed")
    ap.add_argument("--data", default="runs/bench/data", help="train: the preprocessed reference data")
    ap.add_argument("--steps", type=int, default=12, help="train: steps timed (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("-m", "--model", help="translate: checkpoint")
    ap.add_argument("--src", default="runs/bench/test500.en")
    ap.add_argument("--sentences", type=int, default=500)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--forced", type=int, default=23, help="translate: output length (0: natural)")
    ap.add_argument("--quantize", default="none")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.task == "train":
        measure(train_work(args), "target tokens", args.top)
    else:
        if not args.model:
            ap.error("translate needs -m/--model")
        measure(translate_work(args), "sentences", args.top)


if __name__ == "__main__":
    main()
