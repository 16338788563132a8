"""Fused CPU kernels in C (``native.c`` beside this file), built on first use with the system's
C compiler and called through ctypes.

Why: in training, an LSTM (or GRU) cell step written as PyTorch ops is a dozen elementwise kernels forward
and a dozen more backward, each a pass over memory with its own dispatch and thread hand-off;
the C loop does each direction in one pass (reference model, (64, 2048) LSTM gates: forward +
backward ~435 -> ~70 µs; bench/README.md). No PyTorch headers are needed, so the build takes
~0.2 s, once per machine: the library is cached under ``$NMTKIT_CACHE`` (default
``~/.cache/nmtkit``), keyed by the source and the CPU (it is built for the CPU it runs on).

Where there is no compiler, the build fails or ``NMTKIT_NATIVE=0`` is set, ``library()`` is None
and callers compute the same thing with PyTorch ops (tests/test_native.py checks both agree).
The library links the process's libgomp (torch's own), so it shares torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {  # argument types of the C functions
    "nmt_lstm_forward": [_i64, _i64, _ptr, _i64, _int, _ptr, _i64, _int, _ptr, _i64, _ptr, _ptr, _ptr, _int],
    "nmt_lstm_backward": [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _ptr, _int, _ptr, _int],
    "nmt_gru_forward": [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _int],
    "nmt_gru_backward": [_i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _int],
    "nmt_softmax_xent": [_i64, _i64, _ptr, _i64, _int, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _int],
    "nmt_accumulate": [_i64, _i64, _ptr, _i64, _ptr, _i64, _int, _int],
}


def _cpu_id() -> str:
    """What the compiled code depends on besides its source: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


def cache_dir() -> Path:
    return Path(os.environ.get("NMTKIT_CACHE") or Path.home() / ".cache" / "nmtkit")


def library_path() -> Path:
    """Where the library for this source and CPU is (or will be) cached."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    return cache_dir() / f"native-{key}.so"


def build(path: Path) -> str | None:
    """Compile ``native.c`` into ``path`` (atomically: concurrent builds are harmless); None on
    success, else why it failed (one line)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (set CC)"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            return f"{cc} failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        os.replace(tmp, path)
        return None
    except OSError as err:
        return f"{cc}: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None where they cannot be had (see module doc)."""
    if os.environ.get("NMTKIT_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    try:
        path = library_path()
        error = None if path.exists() else build(path)
        if error is None:
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = None
            return lib
    except OSError as err:
        error = str(err)
    print(f"nmtkit: fused C kernels unavailable ({error}); using PyTorch ops", file=sys.stderr)
    return None


FP32, EITHER = (torch.float32,), (torch.float32, torch.bfloat16)


def applies(*tensors: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = FP32) -> bool:
    """Whether the C kernels take these tensors (None: an absent optional input): ``dtypes`` (fp32;
    EITHER: fp32 or bf16) on the CPU, 2-D, unit stride along the last dim."""
    return all(t is None or (t.dtype in dtypes and t.device.type == "cpu" and t.dim() == 2
                             and t.stride(1) == 1) for t in tensors) and library() is not None


def _rows(t: torch.Tensor | None) -> tuple[int | None, int]:
    """(address, row stride) of a 2-D tensor with unit column stride, or (None, 0) for None."""
    return (None, 0) if t is None else (t.data_ptr(), t.stride(0))


def _typed_rows(t: torch.Tensor | None) -> tuple[int | None, int, int]:
    """(address, row stride, whether bf16) of an fp32 or bf16 2-D tensor, or (None, 0, 0) for None."""
    return (*_rows(t), int(t is not None and t.dtype == torch.bfloat16))


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def lstm_forward(gates: torch.Tensor, extra: torch.Tensor | None, c: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gates, extra (n, 4H) fp32 or bf16 (extra may be None), c (n, H) fp32 -> h', c' (n, H) and
    s (n, 4H) = (σ(i), σ(f), tanh(g), σ(o)) of a = gates + extra (in fp32), for ``lstm_backward``."""
    n, H = c.shape
    h_out, c_out, s = c.new_empty(n, H), c.new_empty(n, H), c.new_empty(n, 4 * H)
    library().nmt_lstm_forward(n, H, *_typed_rows(gates), *_typed_rows(extra), *_rows(c), h_out.data_ptr(),
                               c_out.data_ptr(), s.data_ptr(), torch.get_num_threads())
    return h_out, c_out, s


def lstm_backward(dh: torch.Tensor | None, dc: torch.Tensor | None, s: torch.Tensor, c: torch.Tensor,
                  c_new: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream dh', dc' (n, H) (None: zero) and what ``lstm_forward`` kept -> d gates (n, 4H) in
    ``dtype`` (fp32, or bf16: rounded as torch rounds), dc (n, H) fp32."""
    n, H = c.shape
    dh = c.new_zeros(n, H) if dh is None else _unit_columns(dh)
    dc = c.new_zeros(n, H) if dc is None else _unit_columns(dc)
    d_gates, d_c = s.new_empty(n, 4 * H, dtype=dtype), c.new_empty(n, H)
    library().nmt_lstm_backward(n, H, *_rows(dh), *_rows(dc), s.data_ptr(), *_rows(c), c_new.data_ptr(),
                                d_gates.data_ptr(), int(dtype == torch.bfloat16), d_c.data_ptr(),
                                torch.get_num_threads())
    return d_gates, d_c


def gru_forward(x: torch.Tensor, extra: torch.Tensor | None, hg: torch.Tensor, h: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, extra (n, 3H) input projection (extra may be None), hg (n, 3H) hidden projection, h (n, H)
    fp32 -> h' (n, H) and s (n, 3H) = (r, z, ñ), for ``gru_backward``."""
    n, H = h.shape
    h_out, s = h.new_empty(n, H), h.new_empty(n, 3 * H)
    library().nmt_gru_forward(n, H, *_rows(x), *_rows(extra), *_rows(hg), *_rows(h), h_out.data_ptr(), s.data_ptr(),
                              torch.get_num_threads())
    return h_out, s


def gru_backward(dh: torch.Tensor, s: torch.Tensor, hg: torch.Tensor, h: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream dh' (n, H) and what ``gru_forward`` read and kept -> d x (n, 3H) (also d extra),
    d hg (n, 3H), dh (n, H)."""
    n, H = h.shape
    dh = _unit_columns(dh)
    d_x, d_hg, d_h = s.new_empty(n, 3 * H), s.new_empty(n, 3 * H), h.new_empty(n, H)
    library().nmt_gru_backward(n, H, *_rows(dh), s.data_ptr(), *_rows(hg), *_rows(h), d_x.data_ptr(),
                               d_hg.data_ptr(), d_h.data_ptr(), torch.get_num_threads())
    return d_x, d_hg, d_h


def softmax_xent(z: torch.Tensor, target: torch.Tensor, uniform: bool, p_dtype: torch.dtype | None,
                 p_sum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logits z (n, V) fp32 or bf16, targets (n,) -> per row nll = lse − z_y (n,), uni = lse − mean z
    (n,) if ``uniform`` (else None), and p = softmax(z) (n, V) in ``p_dtype`` (None: not wanted; an
    fp32 p overwrites an fp32 z); p_sum (V,) fp32, if given, gets p's column sums added."""
    if p_dtype not in (None, *EITHER):
        raise ValueError(f"softmax_xent writes p as fp32 or bf16, not {p_dtype}")
    n, V = z.shape
    target = target.to(torch.int64).contiguous()
    nll = z.new_empty(n, dtype=torch.float32)
    uni = z.new_empty(n, dtype=torch.float32) if uniform else None
    if p_dtype is None:
        p = None
    elif p_dtype == torch.float32 and z.dtype == torch.float32 and z.is_contiguous():
        p = z
    else:
        p = z.new_empty(n, V, dtype=p_dtype)
    library().nmt_softmax_xent(n, V, *_typed_rows(z), target.data_ptr(), nll.data_ptr(),
                               None if uni is None else uni.data_ptr(), None if p is None else p.data_ptr(),
                               int(p_dtype == torch.bfloat16), None if p_sum is None else p_sum.data_ptr(),
                               torch.get_num_threads())
    return nll, uni, p


def accumulate(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc += x in place for acc (n, m) fp32 and x (n, m) fp32 or bf16 (``applies`` to both);
    returns acc. Same values as ``acc.add_(x)``, without the fp32 copy of x torch makes first."""
    if acc.dtype != torch.float32 or acc.shape != x.shape:
        raise ValueError(f"accumulate adds {tuple(x.shape)} {x.dtype} into fp32 of the same shape, "
                         f"not {tuple(acc.shape)} {acc.dtype}")
    library().nmt_accumulate(*acc.shape, *_rows(acc), *_typed_rows(x), torch.get_num_threads())
    return acc
