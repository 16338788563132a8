#!/usr/bin/env python3
"""Time the training loss alone: the reference model's output layer (10 000 words, 512 inputs) and
summed NLL, forward and backward (nmtkit.model.generator_loss), on random rows.

    python bench/loss_step.py [--rows 2653] [--precision bf16] [--repeats 10]
    python bench/loss_step.py --precision bf16 --against-torch-add --repeats 30

2653 rows = the target tokens of the benchmark data's largest 64-sentence batch. To compare two
commits, run it from outside the checkouts with PYTHONPATH set to each in turn (this machine's
noise is as large as the differences: prefer interleaved comparisons in one process).
``--against-torch-add`` is one: steps alternate between the current code and the same code with
torch's ``acc.add_(x)`` in place of ``native.accumulate`` (the bf16 Σ p hᵀ before f3ed3e6).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nmtkit import native
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
    ap.add_argument("--against-torch-add", action="store_true",
                    help="alternate steps with torch's add_ in place of native.accumulate")
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

    variants = {"current": native.accumulate}
    if args.against_torch_add:
        variants["torch add_"] = lambda acc, x: acc.add_(x)
    for _ in range(3):
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, accumulate in variants.items():
            native.accumulate = accumulate
            times[name].append(step())
    flops = 3 * 2 * args.rows * args.hidden * args.vocab  # z = h Wᵀ, p W, Σ p hᵀ
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{args.precision} {name}: {median * 1e3:.1f} ms per forward + backward (median of "
              f"{args.repeats}; min {min(seconds) * 1e3:.1f}), {flops / median / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
