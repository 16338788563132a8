"""Processes for training: one, or several with ``torch.distributed`` (``torchrun -m nmtkit train``
or ``nmtkit train --nproc N``), NCCL on GPU and gloo on CPU (``--device`` chooses, ``default_device``).
``init_distributed`` joins the process group torchrun describes (or a ``--nproc`` worker's);
``launch`` starts N local workers that meet over loopback and brings back rank 0's result or the
first worker's error. What the processes
compute together (DDP, one update per world_size x update_freq batches) is in nmtkit.train.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from nmtkit.errors import NmtkitError, UsageError


@dataclass
class DistInfo:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")


def default_device(local_rank: int = 0, device: str = "auto") -> torch.device:
    """Where this process trains: ``device`` 'auto' takes GPU ``local_rank`` where CUDA sees a GPU,
    else the CPU; 'cpu' the CPU; 'cuda' GPU ``local_rank`` (a UsageError where there is none)."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU on this machine")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"process {local_rank + 1} on this machine but only {torch.cuda.device_count()} "
                         "GPU(s) (--device cpu trains on the CPU)")
    return torch.device("cuda", local_rank)


def init_distributed(rank: int | None = None, world_size: int | None = None,
                     store: Any = None, device: str = "auto") -> DistInfo:
    """Join the process group: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) or from an explicit rank/world size/store (``--nproc``). NCCL on GPU, gloo on
    CPU (``default_device``). A world of one process is no process group at all."""
    if rank is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    else:
        local_rank = rank
    if world_size is None or world_size <= 1:
        return DistInfo(device=default_device(0, device))
    where = default_device(local_rank, device)
    backend = "nccl" if where.type == "cuda" else "gloo"
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size,
                                  "timeout": timedelta(hours=1)}
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=where)


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _spawned(rank: int, nproc: int, port: int, device: str, fn: Callable[..., Any], args: tuple, queue) -> None:
    """One process of a ``--nproc`` job: join the group over loopback, run ``fn(dist_info, *args)``.
    The outcome goes back to the launcher through ``queue``; NmtkitErrors exit without traceback."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(minutes=5))
        info = init_distributed(rank, nproc, store, device)
        try:
            result = fn(info, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if rank == 0:
            queue.put(("ok", rank, 0, result, ""))
    except NmtkitError as e:
        queue.put(("error", rank, e.exit_code, str(e), type(e).__name__))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        queue.put(("error", rank, 130, "interrupted", "NmtkitError"))
        sys.exit(130)
    except Exception as e:  # a bug, or a peer that died: torch's wrapper keeps the traceback
        queue.put(("crash", rank, 1, f"{type(e).__name__}: {str(e).strip()[:300]}", type(e).__name__))
        raise


def launch(nproc: int, fn: Callable[..., Any], *args: Any, device: str = "auto") -> Any:
    """Run ``fn(dist_info, *args)`` in ``nproc`` local processes (torch.multiprocessing, spawn) on
    ``device`` (``default_device``) that meet over loopback only; returns rank 0's result.
    SIGINT/SIGTERM are passed on to the workers; a worker's NmtkitError comes back as the same
    one-line error."""
    import logging

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1 (got {nproc})")
    on_gpu = default_device(0, device).type == "cuda"
    if on_gpu and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) on this machine "
                         "(--device cpu trains on the CPU)")
    if "GLOO_SOCKET_IFNAME" not in os.environ and not on_gpu:
        loopback = _loopback_interface()
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback  # one machine: no network needed
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(minutes=5))  # port 0: the OS picks a free one; no race
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(_spawned, args=(nproc, store.port, device, fn, args, queue), nprocs=nproc,
                                 join=False, start_method="spawn")

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive() and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # we report failures ourselves
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join(timeout=1):
            pass
    except ProcessException as e:
        # the root cause first: a worker's NmtkitError (its peers then fail in collectives)
        outcomes = _drain(queue)
        errors = sorted((o for o in outcomes if o[0] == "error"), key=lambda o: o[1])
        if errors:
            _, rank, code, message, kind = errors[0]
            error = UsageError(message) if kind == "UsageError" else NmtkitError(message)
            error.exit_code = code
            raise error from None
        if isinstance(e, ProcessExitedException):
            raise NmtkitError(f"training process {e.error_index} of {nproc} died "
                              f"({_describe_exit(e.exit_code)})") from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    outcomes = [o for o in _drain(queue) if o[0] == "ok"]
    return outcomes[0][3] if outcomes else None


def _drain(queue) -> list[tuple]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
