#!/usr/bin/env python3
"""Where the training memory goes: peak and current RSS after each phase of training steps on the
largest 64-sentence batch of the reference model (see profile_train.py).

    python bench/memory_train.py [--data runs/bench/data] [--precision fp32] [--steps 2]
    python bench/memory_train.py --precision bf16 --batches 24   # the first 24 batches instead
"""

from __future__ import annotations

import argparse
import resource

import torch

from nmtkit.data import DataDir, collate, token_batches
from nmtkit.model import build_model
from nmtkit.train import make_optimizer, prepare_config
from nmtkit.translate import autocast
from profile_train import reference_config


def rss(phase: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    print(f"{phase:<12} peak RSS {peak:6.0f} MiB   resident now {now:6.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/bench/data")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batches", type=int, default=0,
                    help="0: the largest batch --steps times; N: the epoch's first N batches (shapes vary)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rss("import")
    data = DataDir(args.data)
    config = prepare_config(reference_config(), data)
    model = build_model(config.model)
    opt = make_optimizer(model, config)
    rss("model+adam")
    train = data.split("train")
    batches = token_batches(train.src_lens, train.tgt_lens, 1_000_000, seed=1, max_sents=64)
    largest = max(batches, key=lambda b: int(train.src_lens[b].sum() + train.tgt_lens[b].sum()))
    chosen = batches[:args.batches] if args.batches else [largest] * args.steps
    model.train()
    for step, idx in enumerate(chosen):
        batch = collate(train, idx)
        with autocast(args.precision):
            loss, _ = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
        if not args.batches:
            rss(f"forward {step}")
        (loss / batch.target_tokens).backward()
        if not args.batches:
            rss(f"backward {step}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.batches or step % 6 == 5:
            rss(f"update {step}")


if __name__ == "__main__":
    main()
