#!/usr/bin/env python3
"""Where the training memory goes: peak and current RSS after each phase of training steps on the
largest 64-sentence batch of the reference model (see profile_train.py).

    python bench/memory_train.py [--data runs/bench/data] [--precision fp32] [--steps 2]
    python bench/memory_train.py --precision bf16 --batches 24   # the first 24 batches instead
    python bench/memory_train.py --live     # also live tensor bytes and glibc's heap after forward
    python bench/memory_train.py --live --by-shape  # and what the live tensors are, by shape

``--live`` separates what the tensors need from what the allocator holds: it counts the bytes of
every tensor storage alive (created under a dispatch mode, freed when the storage is) and reads
glibc's ``mallinfo2`` (heap size, free bytes inside it, bytes in separate mmaps).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import resource
import weakref

import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

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


class LiveBytes(TorchDispatchMode):
    """Bytes of the CPU tensor storages alive that were created under this mode (or ``add``ed)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # storage address -> bytes
        self.kinds: dict[int, tuple] = {}  # storage address -> (shape, dtype) of the tensor that made it
        self.now = self.peak = 0

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_mkldnn:
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.sizes:
            return
        self.sizes[key] = size
        self.kinds[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)
        self.kinds.pop(key, None)

    def by_shape(self, top: int = 12) -> str:
        """The live bytes grouped by tensor shape and dtype, largest groups first (MiB x count)."""
        groups: dict[tuple, list[int]] = {}
        for key, size in self.sizes.items():
            group = groups.setdefault(self.kinds[key], [0, 0])
            group[0] += size
            group[1] += 1
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        return "\n".join(f"{'':<12} {size / 2**20:7.1f} MiB = {count:4d} x {shape} {dtype}"
                         for (shape, dtype), (size, count) in ranked)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map(self.add, out)
        return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap(live: LiveBytes) -> str:
    """Live tensor bytes against glibc's view of the heap (MiB)."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info, mib = mallinfo2(), 2**20
    return (f"live tensors {live.now / mib:.0f} (peak {live.peak / mib:.0f}); glibc heap {info.arena / mib:.0f} "
            f"of which free {info.fordblks / mib:.0f}, separate mmaps {info.hblkhd / mib:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="runs/bench/data")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batches", type=int, default=0,
                    help="0: the largest batch --steps times; N: the epoch's first N batches (shapes vary)")
    ap.add_argument("--live", action="store_true", help="count live tensor bytes and read glibc's heap")
    ap.add_argument("--by-shape", action="store_true", help="with --live: the live tensors after forward, by shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rss("import")
    data = DataDir(args.data)
    config = prepare_config(reference_config(), data)
    model = build_model(config.model)
    opt = make_optimizer(model, config)
    rss("model+adam")
    live = LiveBytes()
    for p in model.parameters():
        live.add(p)
    train = data.split("train")
    batches = token_batches(train.src_lens, train.tgt_lens, 1_000_000, seed=1, max_sents=64)
    largest = max(batches, key=lambda b: int(train.src_lens[b].sum() + train.tgt_lens[b].sum()))
    chosen = batches[:args.batches] if args.batches else [largest] * args.steps
    model.train()
    for step, idx in enumerate(chosen):
        batch = collate(train, idx)
        live.peak = live.now
        with live if args.live else contextlib.nullcontext():
            with autocast(args.precision):
                loss, _ = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)
            if not args.batches:
                rss(f"forward {step}")
                if args.live:
                    print(f"{'':<12} {heap(live)}")
                if args.live and args.by_shape:
                    print(live.by_shape())
            (loss / batch.target_tokens).backward()
            if not args.batches:
                rss(f"backward {step}")
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not args.batches or step % 6 == 5:
            rss(f"update {step}")
        if args.live and not args.batches:
            print(f"{'':<12} {heap(live)}")


if __name__ == "__main__":
    main()
