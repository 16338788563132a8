#!/usr/bin/env python3
"""Time the training loss alone: the reference model's output layer (10 000 words, 512 inputs) and
summed NLL, forward and backward (nmtkit.model.generator_loss), on random rows.

    python bench/loss_step.py [--rows 2653] [--precision bf16] [--repeats 10]

2653 rows = the target tokens of the benchmark data's largest 64-sentence batch. To compare two
commits, run it from outside the checkouts with PYTHONPATH set to each in turn.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nmtkit.kernels import Linear
from nmtkit.model import generator_loss
from nmtkit.translate import autocast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2653)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    generator = Linear(args.hidden, args.vocab)
    h = torch.randn(args.rows, args.hidden, requires_grad=True)
    target = torch.randint(4, args.vocab, (args.rows,))

    def step() -> float:
        start = time.perf_counter()
        with autocast(args.precision):
            loss, _ = generator_loss(h, generator, target)
        loss.backward()
        generator.weight.grad = generator.bias.grad = h.grad = None
        return time.perf_counter() - start

    for _ in range(3):
        step()
    seconds = statistics.median(step() for _ in range(args.repeats))
    flops = 3 * 2 * args.rows * args.hidden * args.vocab  # z = h Wᵀ, p W, Σ p hᵀ
    print(f"{args.precision}: {seconds * 1e3:.1f} ms per forward + backward (median of {args.repeats}), "
          f"{flops / seconds / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
