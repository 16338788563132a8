#!/usr/bin/env python3
"""Profile training steps of the reference model (torch.profiler): where the time goes.

    python bench/profile_train.py [--data runs/bench/data] [--steps 12] [--precision fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nmtkit.config import Config
from nmtkit.data import DataDir, collate, token_batches
from nmtkit.model import build_model
from nmtkit.train import make_optimizer, prepare_config
from nmtkit.translate import autocast


def reference_config() -> Config:
    """The issue's reference model: 2-layer biLSTM 512, 2-layer LSTM decoder 512, emb 512,
    luong-general global attention, input feeding, dropout 0.3, Adam 1e-3, 64 sentences."""
    config = Config()
    m = config.model
    m.encoder, m.decoder, m.attention, m.window, m.rnn = "birnn", "luong", "luong-general", "global", "lstm"
    m.layers, m.hidden_size, m.embed_size, m.dropout, m.input_feed = 2, 512, 512, 0.3, True
    t = config.train
    t.optimizer, t.lr, t.batch_tokens, t.batch_sents = "adam", 1e-3, 1_000_000, 64
    return config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/bench/data")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="only time the steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(1)
    data = DataDir(args.data)
    config = prepare_config(reference_config(), data)
    config.train.precision = args.precision
    model = build_model(config.model)
    opt = make_optimizer(model, config)
    train = data.split("train")
    batches = token_batches(train.src_lens, train.tgt_lens, 1_000_000, seed=1, max_sents=64)

    def step(b):
        batch = collate(train, b)
        with autocast(args.precision):
            loss, _ = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
        opt.zero_grad(set_to_none=True)
        (loss / batch.target_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return batch.target_tokens

    model.train()
    for b in batches[:args.warmup]:
        step(b)
    tokens, start = 0, time.perf_counter()
    prof = profile(activities=[ProfilerActivity.CPU]) if not args.no_profile else contextlib.nullcontext()
    with prof:
        for b in batches[args.warmup:args.warmup + args.steps]:
            tokens += step(b)
    elapsed = time.perf_counter() - start
    if not args.no_profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{tokens} target tokens in {elapsed:.2f} s{'' if args.no_profile else ' under the profiler'}: "
          f"{tokens / elapsed:.0f} tokens/s")


if __name__ == "__main__":
    main()
