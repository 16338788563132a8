#!/usr/bin/env python3
"""Profile translation (torch.profiler): where the time of greedy / beam search goes.

    python bench/profile_translate.py -m runs/bench/nmtkit-fp32-r1/best.pt [--beam 5] [--forced 23]
        [--precision bf16] [--quantize int8] [--sentences 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nmtkit.checkpoint import LoadedModel
from nmtkit.model import Seq2Seq
from nmtkit.translate import DecodeOptions, prepare_for_inference, translate_ids


def prepared_translation(args) -> tuple[Seq2Seq, list[list[int]], DecodeOptions]:
    """The model of ``args.model`` prepared for inference, the first ``args.sentences`` lines of
    ``args.src`` as token ids, and the decoding options (batch 32, output forced to ``args.forced``
    tokens), after one warm-up batch (which also packs the generator's weight)."""
    loaded = LoadedModel(args.model)
    model = prepare_for_inference(loaded.model, args.precision, args.quantize)
    lines = open(args.src, encoding="utf-8").read().splitlines()[:args.sentences]
    sources = [loaded.src_tok.encode(line) for line in lines]
    opts = DecodeOptions(beam=args.beam, batch_size=32, precision=args.precision, quantize=args.quantize,
                         min_len=args.forced, max_len=args.forced)
    translate_ids(model, sources[:32], opts)
    return model, sources, opts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--src", default="runs/bench/test500.en")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--forced", type=int, default=23)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--sentences", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=22)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, sources, opts = prepared_translation(args)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        translate_ids(model, sources, opts)
    elapsed = time.perf_counter() - start
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{len(sources)} sentences in {elapsed:.2f} s under the profiler: {len(sources) / elapsed:.1f} sent/s")


if __name__ == "__main__":
    main()
