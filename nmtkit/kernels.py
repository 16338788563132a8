"""Step-loop kernels for the recurrent decoders (speed only: every function here computes exactly
what the plain PyTorch expression in its docstring computes; tests/test_speed_paths.py checks it).

Deferred weight gradients. A weight W used at every target step t as y_t = x_t Wᵀ + b gets, from
autograd, one small gradient matmul gy_tᵀ x_t per step plus one full-size accumulation of dW per
step (for a 2048 x 1536 LSTM weight that is 12 MB of memory traffic per step). ``SharedLinear``
instead keeps each step's (x_t, gy_t) and computes dW = [gy_1; ...; gy_T]ᵀ [x_1; ...; x_T] and
db = Σ gy_t as a few large, efficient matmuls, one per 16 steps (``_Bank``). The per-step backward
does only dx_t = gy_t W. The engine guarantees the order: the weight's node
waits for every node that consumed its (empty) ``token``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import resource

import torch
from torch import nn
from torch.autograd import Function

from nmtkit import native

_DEFER = True  # switched off only to compare with plain autograd (tests, benchmarks)
_ONEDNN = os.environ.get("NMTKIT_ONEDNN", "1") != "0"  # 0: fp32 matmuls as torch does them (MKL)


@contextlib.contextmanager
def plain_autograd():
    """Within this block SharedLinear uses plain autograd (per-step weight gradients)."""
    global _DEFER
    old, _DEFER = _DEFER, False
    try:
        yield
    finally:
        _DEFER = old


# ---------------------------------------------------------------- fp32 matmuls through oneDNN
#
# On CPU torch runs fp32 F.linear / addmm / mm through MKL's sgemm. On the AMD EPYC we benchmark on,
# MKL does not use AVX-512 and reaches ~150 GFLOP/s on a 2048³ product with 2 threads, where
# oneDNN's matmul (torch's own ``mkldnn::_linear_pointwise``, the op torch.compile emits for CPU
# linears) reaches ~220; on the decoder's step shapes (32-64 rows) the gap is 1.3-2x
# (bench/README.md). ``linear`` computes F.linear(x, W, b) with that op whenever it applies
# (fp32 on CPU, no autocast), with an autograd Function for training; results differ from MKL's
# only by float rounding (summation order).


@functools.cache
def _onednn_op():
    """torch's oneDNN linear op if this build has it and it computes a tiny product right, else None."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        ok = torch.equal(op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0))
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


def _onednn_for(*tensors: torch.Tensor | None) -> bool:
    """Whether fp32 products of these CPU tensors (None: absent, e.g. no bias) go through oneDNN."""
    return (_ONEDNN and not torch.is_autocast_enabled("cpu") and _onednn_op() is not None
            and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors))


def bucket_rows(m: int, down: bool = False) -> int:
    """m rounded up (``down``: down) to one of 8 sizes per octave (exact below 16; at most 12.5 %
    more rows).

    oneDNN builds, and keeps in its cache (1024 primitives by default; see
    ``bound_primitive_cache``), one primitive with its own JIT code (0.7-2 MB) per product shape.
    Row counts vary from batch to batch (sentence lengths, the loss's last chunk, shrinking beams),
    so without buckets training held ~500 MB more after 100 steps; with them a run sees a few dozen
    shapes per weight.
    """
    g = 1 << max(0, m.bit_length() - 4)  # 2^(floor(log2 m) - 3)
    return m // g * g if down else -(-m // g) * g


PRIMITIVE_CACHE_CAPACITY = 16


def bound_primitive_cache(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> None:
    """Have oneDNN cache at most ``capacity`` primitives (its default: 1024), unless the user set
    ONEDNN_PRIMITIVE_CACHE_CAPACITY (or its older name DNNL_...). oneDNN reads the variable when it
    creates its first primitive: call this before the process's first oneDNN product (the
    ``nmtkit`` command does, first thing).

    Even with bucketed rows a training run meets a few dozen shapes per weight, and each cached
    primitive's code sits in the heap among the tensors of the step that created it, pinning pages
    glibc would otherwise reuse or return. Reference model, 100 training steps, 2 threads
    (bench/README.md): peak RSS fp32 1431-1541 -> 1248-1307 MiB, bf16 1538-1614 -> 1357-1395 MiB,
    tokens/s the same within the noise (a cache of 0 costs 7-20 %: the step loop's primitives are
    rebuilt every step).
    """
    if not any(f"{prefix}_PRIMITIVE_CACHE_CAPACITY" in os.environ for prefix in ("ONEDNN", "DNNL")):
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)


def _pad_rows(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """x with zero rows appended along ``dim`` up to ``rows`` (a copy, and zeros for the new rows
    only: F.pad zero-fills everything first); differentiable."""
    extra = rows - x.size(dim)
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def _on_bucketed_rows(product, x: torch.Tensor) -> torch.Tensor:
    """``product`` (a row-wise map (M, in) -> (M, out)) of x (..., in), run on x's rows zero-padded
    to ``bucket_rows`` (no padding, and no slicing, where M already is a bucket)."""
    x2 = x.reshape(-1, x.size(-1))  # (M, in)
    m = x2.size(0)
    rows = bucket_rows(m)
    y = product(x2) if rows == m else product(_pad_rows(x2, rows))[:m]  # (M, out)
    return y.view(*x.shape[:-1], y.size(-1))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b through oneDNN for x (..., in), on bucketed rows."""
    return _on_bucketed_rows(lambda rows: _onednn_op()(rows, weight, bias, "none", [], ""), x)


def _shape_cached(t: torch.Tensor) -> bool:
    """Whether torch itself runs products of ``t``'s dtype (under the current autocast) through
    oneDNN, which keeps a primitive per shape (up to 4 MB each for bf16, measured): CPU bf16/fp16.
    fp32 products that do not go through ``_onednn_linear`` run in MKL, which caches nothing."""
    return t.device.type == "cpu" and compute_dtype(t.dtype) in (torch.bfloat16, torch.float16)


def rows_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ b summed over rows: a (N, p), b (N, q) -> (p, q); batched a (D, N, p), b (D, N, q) -> (D, p, q).
    Weight gradients. Where torch caches a oneDNN primitive per shape (``_shape_cached``), N is
    padded with zero rows to ``bucket_rows`` (zero rows add nothing)."""
    dim = a.dim() - 2
    if _shape_cached(a):
        rows = bucket_rows(a.size(dim))
        a, b = _pad_rows(a, rows, dim), _pad_rows(b, rows, dim)
    return a.t().mm(b) if dim == 0 else torch.bmm(a.transpose(1, 2), b)


def add_rows_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + aᵀ b for a (N, p), b (N, q) (``rows_product``), accumulated in fp32 (fp64 for fp64):
    in place into acc (p, q), or a new (p, q) where acc is None. A sum of such products over chunks
    of rows (the output layer's Σ_i p_i h_iᵀ, nmtkit.model._GeneratorNLL).

    fp32 (and fp64) a, b: ``acc.addmm_``, in place, no (p, q) temporary. (oneDNN computes the
    product as (bᵀ a)ᵀ faster, 14 ms against 23 at 416 x 10 000 x 512, but its temporaries cost
    the reference model's training 200-300 MiB of peak RSS: bench/README.md.) bf16 a, b: the product
    in bf16, added by the C kernel without the fp32 copy of it that ``acc.add_`` makes first
    (``native.accumulate``).
    """
    if acc is not None and a.dtype == acc.dtype:
        return acc.addmm_(a.t(), b)
    product = rows_product(a, b)  # (p, q) in a's dtype
    if acc is None:
        return wide(product)
    if native.applies(acc, product, dtypes=native.EITHER):
        return native.accumulate(acc, product)
    return acc.add_(product)


class _OneDNNLinear(Function):
    """y = x Wᵀ + b; backward dx = gy W through oneDNN, dW = gyᵀ x and db = Σ gy as torch does them
    (a reduction over all rows: MKL is as fast there)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[0]:
            d_x = linear(gy, weight.t())  # (..., in)
        gy2 = gy.reshape(-1, gy.size(-1))  # (N, out)
        if ctx.needs_input_grad[1]:
            d_w = rows_product(gy2, x.reshape(-1, x.size(-1)))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = gy2.sum(0)
        return d_x, d_w, d_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, b) = x Wᵀ + b for x (..., in), W (out, in); fp32 on CPU through oneDNN.

    ``packed``: W in oneDNN's blocked layout (``pack_weight``), used when no gradient is needed.
    """
    if weight.dim() != 2 or x.numel() == 0 or not _onednn_for(x, weight, bias):
        if weight.dim() == 2 and x.numel() and _shape_cached(weight):  # bf16: rows bucketed too
            return _on_bucketed_rows(lambda rows: torch.nn.functional.linear(rows, weight, bias), x)
        return torch.nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight if packed is None else packed, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """W (out, in) reordered once into oneDNN's blocked layout (a further ~25 % on small batches),
    or None where ``linear`` would not use oneDNN."""
    if not _onednn_for(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


@contextlib.contextmanager
def plain_matmuls():
    """Within this block fp32 matmuls run as torch runs them (MKL), not through oneDNN."""
    global _ONEDNN
    old, _ONEDNN = _ONEDNN, False
    try:
        yield
    finally:
        _ONEDNN = old


_MADV_PAGEOUT = 21  # Linux >= 5.4


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call."""
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory mappings of files (/proc/self/maps; empty
    where there is none)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            spans.append((int(start, 16), int(end, 16)))
    return spans


def _advise_file_pages(tensors: tuple[torch.Tensor | None, ...], advice: int,
                       files: list[tuple[int, int]] | None = None) -> None:
    """madvise(advice) over the whole pages of these CPU tensors that lie in file mappings; memory
    not backed by a file is never advised. A no-op where unsupported. ``files``: the mappings as
    ``_file_mappings`` gave them after these tensors were made (they cannot have changed under
    a live tensor; each read of /proc/self/maps costs ~3 ms), else read here."""
    madvise, page = _madvise(), resource.getpagesize()
    tensors = [t for t in tensors if t is not None and t.device.type == "cpu"]
    if madvise is None or not tensors:
        return
    files = _file_mappings() if files is None else files
    for t in tensors:
        if t.is_contiguous():  # the tensor's own bytes (a slice of rows: those rows only)
            first, nbytes = t.data_ptr(), t.numel() * t.element_size()
        else:
            first, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        start = -(-first // page) * page  # whole pages inside only
        end = (first + nbytes) // page * page
        for lo, hi in files:
            lo, hi = max(lo, start), min(hi, end)
            if hi > lo:
                madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), advice)


def page_out(*tensors: torch.Tensor | None, files: list[tuple[int, int]] | None = None) -> None:
    """Ask the kernel to reclaim the memory pages of these CPU tensors that are backed by a file
    (madvise MADV_PAGEOUT), i.e. weights read from a memory-mapped checkpoint that translation has
    replaced by derived copies (oneDNN-packed, fused, int8, bf16). Clean file pages are dropped and
    read again from the file if ever touched; contents never change, so this costs at most time.
    Memory not backed by a file (a model built or converted in this process) is left alone: without
    swap it could not go anywhere, and with swap it would be written out and read back.
    ``files``: see ``_advise_file_pages``.
    """
    _advise_file_pages(tensors, _MADV_PAGEOUT, files)


_MADV_DONTNEED = 4


def let_go(*tensors: torch.Tensor | None) -> None:
    """Unmap the pages of these CPU tensors that lie in a file mapping (madvise MADV_DONTNEED): the
    process's resident memory no longer counts them, the page cache keeps them, and touching them
    again maps them back (a minor fault, ~0.6 ms per 1000 embedding rows against ~16 ms after
    ``page_out``, and 0.5 ms per call against 6.7: bench/README.md). For tensors that are never
    written, like the embedding tables of a model prepared for inference: in a private file
    mapping a page written since would go back to the file's content."""
    _advise_file_pages(tensors, _MADV_DONTNEED)


class Linear(nn.Linear):
    """nn.Linear whose product goes through ``linear`` (same parameters, same state dict).

    ``pack()`` (translation, after the weights are final) asks for derived copies of the weight,
    each made at its first use and dropped for good as soon as the weight changes: for ``forward``
    the weight in oneDNN's blocked layout, for ``argmax`` an ``ArgmaxScreen`` (greedy search never
    makes the fp32 copy, beam search never the screen). The fp32 original, read from the memory-
    mapped checkpoint, is then paged out. Made at the first call, i.e. the first decoder step, when
    the search holds least (made at the 16th call, reading the whole fp32 weight beside its copy put
    ~20 MB on top of the search's working set: fp32 beam 5 peak RSS 387 -> 377 MiB,
    bench/README.md). The 10k x 512 generator's reorder costs ~5 ms, once.
    """

    _packed: torch.Tensor | None = None
    _packed_version: int = -1
    _pack_wanted: bool = False
    _screen: ArgmaxScreen | None = None
    _screen_version: int = -1
    _screen_wanted: bool = False

    def pack(self) -> None:
        self._pack_wanted = self._screen_wanted = True

    def argmax(self, x: torch.Tensor, banned: int | None = None) -> torch.Tensor:
        """x (N, in) -> argmax over columns of the fp32 logits x Wᵀ + b (N,), column ``banned``
        never chosen (min_len forbids EOS); through an ``ArgmaxScreen`` once ``pack()`` asked for it."""
        if self._screen_wanted:
            self._screen_wanted = False
            if ArgmaxScreen.applies(self.weight):
                self._screen, self._screen_version = ArgmaxScreen(self.weight, self.bias), self.weight._version
                page_out(self.weight)  # the screen re-reads only the few candidate rows
        screen = self._screen = self._current(self._screen, self._screen_version)
        tokens = screen(x, banned) if screen is not None and x.size(0) and _onednn_for(x) else None
        if tokens is None:  # no screen (or no fp32 product wanted: autocast), or a row it cannot bound
            tokens = argmax_logits(linear(x, self.weight, self.bias).float(), banned)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pack_wanted:
            self._pack_wanted = False
            self._packed, self._packed_version = pack_weight(self.weight), self.weight._version
            if self._packed is not None:
                page_out(self.weight)  # read from the checkpoint file: no longer needed in memory
        packed = self._packed = self._current(self._packed, self._packed_version)
        return linear(x, self.weight, self.bias, packed)

    def _current(self, copy, version: int):
        """``copy`` while the weight is the one it was made from (and needs no gradient), else None."""
        w = self.weight
        return copy if copy is not None and w._version == version and not w.requires_grad else None


class PackedLinear(nn.Module):
    """Inference-only x Wᵀ + b holding W only in oneDNN's blocked layout (``pack_weight``), for
    weights that exist only as derived copies (the fused decoder layers): no plain copy stays
    resident beside the packed one. ``packed`` is not a buffer: never saved, never moved."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed, self.bias = packed, bias  # packed: (out, in) blocked; bias: (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_linear(x, self.packed, self.bias)


def argmax_logits(logits: torch.Tensor, banned: int | None = None) -> torch.Tensor:
    """logits (N, V) -> the index of each row's maximum (N,) (the first of equal ones), never ``banned``."""
    if banned is not None:
        logits[:, banned] = -math.inf
    return logits.argmax(dim=-1)


_U_BF16, _U_FP32 = 2.0 ** -8, 2.0 ** -24  # unit roundoffs (round to nearest)
SCREEN_BLOCK = 64


class ArgmaxScreen:
    """Exact argmax_v (x W_vᵀ + b_v) of fp32 logits, found through bf16 products (greedy search).

    The (N, V) product with the 10k x 512 generator is ~45 % of a greedy decoder step in fp32;
    in bf16 it takes half the time. The bf16 logits z̃ differ from the exact z by at most
    E_r = c · S_r + d per row, with S_r = ||x_r||₂ · max_v ||W_v||₂ ≥ Σ_i |x_ri| |W_vi| for every v
    (Cauchy-Schwarz), c from the roundings of x and W to bf16 (u = 2⁻⁸ each), of the
    fp32 accumulation over K terms (γ_K = K·2⁻²⁴/(1 − K·2⁻²⁴)), of the bf16 output and of the fp32
    bias addition, plus γ_K once more for the fp32 recomputation below, and a 1 % margin. The row's
    argmax can only be a column with z̃_v ≥ max z̃ − 2E_r; those candidates (usually a handful) are
    recomputed in fp32 from the fp32 weight rows, and the largest wins (the first of equal ones, as
    torch.argmax). So the answer is the argmax of fp32 logits, as the fp32 product gives it up to
    the summation order of its fp32 sums. Candidates are found 64 columns at a time: block maxima
    first, then the columns of the blocks that pass.

    Holds the bf16 weight in oneDNN's blocked layout (half the fp32 copy), padded with zero rows to
    whole blocks, the padded columns' bias -inf.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        V, K = weight.shape
        weight = weight.detach()
        bias = weight.new_zeros(V) if bias is None else bias.detach()
        pad = -V % SCREEN_BLOCK
        self.weight, self.bias = weight, bias  # (V, K), (V,) fp32: the candidates' exact logits
        padded = weight.new_zeros(V + pad, K, dtype=torch.bfloat16)  # one bf16 temporary
        self.row_norm = 0.0
        files = _file_mappings()  # read once: the mapping of ``weight`` lives as long as it does
        for start in range(0, V, 1024):  # never all fp32 rows resident at once (mapped checkpoint)
            rows = weight[start:start + 1024]  # (≤ 1024, K)
            padded[start:start + len(rows)] = rows
            self.row_norm = max(self.row_norm, float(rows.norm(dim=1).max()))
            page_out(rows, files=files)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(padded)  # (V + pad, K) blocked
        del padded
        self.padded_bias = torch.cat([bias, bias.new_full((pad,), -math.inf)])  # (V + pad,)
        u, u32 = _U_BF16, _U_FP32
        gamma = (K + 1) * u32 / (1 - (K + 1) * u32)
        self.rel = 1.01 * ((2 * u + u * u) + (1 + u) ** 2 * (gamma + (u + u32 * (1 + u)) * (1 + gamma)) + gamma)
        self.abs = 1.01 * u32 * float(bias.abs().max()) + 1e-30  # the bias addition; flushed denormals

    @staticmethod
    def applies(weight: torch.Tensor) -> bool:
        """fp32 CPU weights through oneDNN on a CPU with native bf16 products."""
        return _onednn_for(weight) and weight.dim() == 2 and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def __call__(self, x: torch.Tensor, banned: int | None = None) -> torch.Tensor | None:
        """x (N, K) fp32 -> argmax (N,) of x Wᵀ + b, ``banned`` never chosen; None where a row's
        logits are not all finite (the caller computes those plainly)."""
        N = x.size(0)
        y = _on_bucketed_rows(lambda rows: _onednn_op()(rows, self.packed, None, "none", [], ""),
                              x.to(torch.bfloat16))  # (N, V + pad) bf16
        approx = torch.add(self.padded_bias, y)  # (N, V + pad) fp32
        if banned is not None:
            approx[:, banned] = -math.inf
        blocks = approx.view(N, -1, SCREEN_BLOCK)  # (N, nb, 64)
        block_max = blocks.amax(2)  # (N, nb)
        best = block_max.amax(1)  # (N,)
        if not bool(torch.isfinite(best).all()):
            return None
        floor = best - 2 * (self.rel * self.row_norm * x.norm(dim=1) + self.abs)  # (N,) no argmax below
        rows, chosen = (block_max >= floor.unsqueeze(1)).nonzero(as_tuple=True)  # candidate blocks
        inside = blocks[rows, chosen] >= floor.index_select(0, rows).unsqueeze(1)  # (n, 64)
        which, col = inside.nonzero(as_tuple=True)
        rows, cols = rows.index_select(0, which), chosen.index_select(0, which) * SCREEN_BLOCK + col
        exact = (torch.linalg.vecdot(self.weight.index_select(0, cols), x.index_select(0, rows))
                 + self.bias.index_select(0, cols))  # (n,) fp32 logits of the candidates
        top = exact.new_full((N,), -math.inf).scatter_reduce(0, rows, exact, "amax")
        win = exact == top.index_select(0, rows)
        return cols.new_full((N,), self.weight.size(0)).scatter_reduce(0, rows[win], cols[win], "amin")


class _Bank:
    """Per-step inputs and output gradients of one shared weight, filled during backward and
    folded into dW, db every FOLD_STEPS steps (one matmul over that many steps' rows: large
    enough to run at full speed, while the banked gradients stay a few MB)."""

    FOLD_STEPS = 16
    __slots__ = ("has_bias", "slices", "x", "gy", "d_weight", "d_bias")

    def __init__(self, has_bias: bool, slices: int = 0) -> None:
        self.has_bias = has_bias
        self.slices = slices  # D of a batched (D, out, in) weight, else 0
        self.x: list[torch.Tensor] = []
        self.gy: list[torch.Tensor] = []
        self.d_weight: torch.Tensor | None = None
        self.d_bias: torch.Tensor | None = None

    def add(self, x: torch.Tensor, gy: torch.Tensor) -> None:
        self.x.append(x)
        self.gy.append(gy)
        if len(self.gy) >= self.FOLD_STEPS:
            self.fold()

    def fold(self) -> None:
        """d_weight += [gy_1; ...]ᵀ [x_1; ...], d_bias += Σ gy over the banked steps. Batched (3-D)
        steps may use the first n ≤ D weights only (sentences leave the batch): a step's missing
        slices count as zero rows."""
        if not self.gy:
            return
        dim = self.gy[0].dim() - 2  # rows are dim 0 (2-D) or dim 1 (batched 3-D)
        gy, x = _cat_rows(self.gy, self.slices), _cat_rows(self.x, self.slices)  # ([D,] N, out), ([D,] N, in)
        self.x, self.gy = [], []
        d_weight = rows_product(gy, x)  # ([D,] out, in)
        d_bias = gy.sum(dim) if self.has_bias else None
        if self.d_weight is None:
            self.d_weight, self.d_bias = d_weight, d_bias
        else:
            self.d_weight += d_weight
            if d_bias is not None:
                self.d_bias += d_bias


def _cat_rows(parts: list[torch.Tensor], slices: int) -> torch.Tensor:
    """The banked steps' rows in one tensor: (N, ·) parts joined on dim 0; with ``slices`` D,
    (n, N_i, ·) parts with n ≤ D joined on dim 1 into (D, ΣN_i, ·), missing slices zero."""
    if not slices:
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    if all(p.size(0) == slices for p in parts):
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    out = parts[0].new_zeros(slices, sum(p.size(1) for p in parts), parts[0].size(2))
    start = 0
    for p in parts:
        out[:p.size(0), start:start + p.size(1)] = p
        start += p.size(1)
    return out


ONEDNN_MIN_ROWS = 8  # batched products with fewer rows per slice run as one bmm


def _mm_t(x: torch.Tensor, weight: torch.Tensor, packed: list[torch.Tensor] | None = None) -> torch.Tensor:
    """x Wᵀ for x (N, in), W (out, in); batched for x (D, N, in), W (D, out, in): D oneDNN products
    where each is a matrix product (the directions of a biRNN), else one bmm (attention: D sentences,
    a query or a few per sentence). ``packed``: W (each of its first D slices) in oneDNN's blocked
    layout (``_StepPacks``)."""
    if packed is not None:
        if weight.dim() == 2:
            return _onednn_linear(x, packed[0], None)
        return torch.stack([_onednn_linear(x[d], packed[d], None) for d in range(x.size(0))])
    if weight.dim() == 2:
        return linear(x, weight)
    if x.size(1) >= ONEDNN_MIN_ROWS and _onednn_for(x, weight):
        return torch.stack([linear(x[d], weight[d]) for d in range(weight.size(0))])
    return torch.bmm(x, weight.transpose(1, 2))


class _StepPacks:
    """A step weight W in oneDNN's blocked layout, made at a step loop's first product and used by
    all its steps' forward products x Wᵀ, dropped when the backward starts (``drop``). oneDNN
    multiplies a packed fp32 weight 10-30 % faster than a plain one on the step shapes (64 rows),
    and the reorder (a copy of W) is paid once per batch, not at every step: reference-model
    training +2-4 % (bench/README.md). Packing Wᵀ for the backward's gy W as well gained nothing
    there (the strided reorder costs what it saves), nor did packing bf16 weights.

    Applies to fp32 CPU products through oneDNN (``_onednn_for``) of 2-D weights, and of 3-D ones
    whose products each have ``ONEDNN_MIN_ROWS`` rows or more (a biRNN's directions; not
    attention's per-sentence keys).
    """

    __slots__ = ("packed",)

    def __init__(self) -> None:
        self.packed: list[torch.Tensor] | None = None

    def get(self, x: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor] | None:
        """W's slices packed (one for a 2-D W), or None where packing does not apply."""
        if (weight.dim() == 3 and x.size(1) < ONEDNN_MIN_ROWS) or not _onednn_for(x, weight):
            return None
        if self.packed is None:
            slices = [weight] if weight.dim() == 2 else weight.unbind(0)
            self.packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in slices]
        return self.packed

    def drop(self) -> None:
        self.packed = None


class _WeightNode(Function):
    """(W, b) -> an empty token; backward returns the bank's dW, db (None if no step was used)."""

    @staticmethod
    def forward(ctx, weight, bias, bank):
        ctx.bank = bank
        return weight.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        bank = ctx.bank
        bank.fold()
        d_weight, d_bias = bank.d_weight, bank.d_bias
        bank.d_weight = bank.d_bias = None
        return d_weight, d_bias, None


class _StepLinear(Function):
    """y = x Wᵀ + b for one step; backward returns dx and files (x, gy) in the bank."""

    @staticmethod
    def forward(ctx, x, weight, bias, token, bank, packs):
        ctx.in_dtype = x.dtype
        x = x.to(weight.dtype).contiguous()
        packed = packs.get(x, weight)
        n = weight.size(0) if weight.dim() == 2 else x.size(0)
        if weight.dim() == 3 and n < weight.size(0):  # the first sentences' weights only
            weight, bias = weight[:n], None if bias is None else bias[:n]
        ctx.save_for_backward(x)
        ctx.weight, ctx.bank, ctx.packs = weight, bank, packs
        with torch.autocast(weight.device.type, enabled=False):
            y = _mm_t(x, weight, packed)
            if bias is not None:
                y = y.add_(bias.unsqueeze(-2) if weight.dim() == 3 else bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        gy = gy.to(ctx.weight.dtype).contiguous()
        ctx.bank.add(x, gy)
        ctx.packs.drop()  # the forward is over
        dx = _mm_t(gy, ctx.weight.transpose(-1, -2)).to(ctx.in_dtype)  # gy W
        return dx, None, None, ctx.weight.new_zeros(0), None, None


class SharedLinear:
    """A weight (and optional bias) applied at every step of a loop: ``self(x)`` = F.linear(x, W, b).

    A 3-D weight (D, out, in) applies D weights to x (D, N, in) at once (both directions of a
    bidirectional RNN; attention's q·keysᵀ and a·memory, one weight per sentence), or its first
    n weights to x (n, N, in) (the sentences still decoding in training). Built once per
    forward pass from tensors that may be views or casts of parameters (e.g. the concatenation
    [W_x W_h] in the compute dtype). When gradients are needed the weight gradient
    is deferred to a few large matmuls, one per 16 steps (see the module docstring); otherwise it
    is a plain ``linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.defer = _DEFER and torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad))
        if self.defer:
            self.bank = _Bank(bias is not None, weight.size(0) if weight.dim() == 3 else 0)
            self.token = _WeightNode.apply(weight, bias, self.bank)
            self.packs = _StepPacks()
            self.w = weight.detach()
            self.b = None if bias is None else bias.detach()
        else:
            self.w, self.b = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.defer:
            return _StepLinear.apply(x, self.w, self.b, self.token, self.bank, self.packs)
        x = x.to(self.w.dtype)
        if self.w.dim() == 3:
            n = x.size(0)  # the first n slices (sentences may have left the batch)
            y = _mm_t(x, self.w[:n])
            return y if self.b is None else y + self.b[:n].unsqueeze(-2)
        return linear(x, self.w, self.b)


KEEP_BITS = 16  # the CPU dropout mask's resolution: keep probabilities are multiples of 2⁻¹⁶


def keep_probability(p: float) -> float:
    """q, the probability that ``_kept`` keeps an element for dropout rate p: 1 − p rounded to the
    nearest multiple of 2⁻¹⁶ (within 2⁻¹⁷ = 7.6e-6 of it; at least 2⁻¹⁶)."""
    return max(1, round((1.0 - p) * (1 << KEEP_BITS))) / (1 << KEEP_BITS)


def _kept(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask, each element True with probability ``keep_probability(p)``, independently.

    On CPU each element is one 16-bit lane of full-range 64-bit random words (four per word), kept
    when below q·2¹⁶: a quarter of the generator's draws of torch.rand(shape) < q and no conversion
    to floats (a (64, 50, 512) mask 5.7 → 2.0 ms; F.dropout's bernoulli_ takes 15, bench/README.md).
    """
    q = keep_probability(p)
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) < q
    if q == 1.0:  # q·2¹⁶ does not fit the int16 lanes
        return torch.ones(shape, dtype=torch.bool)
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(1 << 63), None)  # uniform over all 2⁶⁴
    lanes = words.view(torch.int16)[:n].view(shape)  # each uniform over [−2¹⁵, 2¹⁵)
    return lanes < round(q * (1 << KEEP_BITS)) - (1 << 15)


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverted-dropout mask (fp32): each element 1/q with probability q = ``keep_probability(p)``
    (1 − p to within 2⁻¹⁷), else 0, independently; E[mask] = 1 exactly."""
    return _kept(shape, p, device).float().div_(keep_probability(p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) in distribution (keep probability ``keep_probability(p)``, kept
    elements scaled by its inverse); on CPU with a faster mask (``_kept``) that is kept for backward
    as bool (1 byte per element, as F.dropout keeps)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return torch.nn.functional.dropout(x, p, True)
    return _Dropout.apply(x, p)


class _Dropout(Function):
    """y = x ⊙ m / q with m ~ Bernoulli(q) elementwise, q = ``keep_probability(p)``; keeps m as
    bool for backward."""

    @staticmethod
    def forward(ctx, x, p):
        keep = _kept(x.shape, p)  # (x.shape) bool
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / keep_probability(p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """nn.Dropout through ``dropout`` (same module, no parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def compute_dtype(default: torch.dtype = torch.float32, device_type: str = "cpu") -> torch.dtype:
    """The matmul dtype under the current autocast of ``device_type`` (bf16) or ``default``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors upcast to fp32; fp32 and fp64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = 2σ(2x) − 1 (absolute error ≤ 2.4e-7 in fp32): torch's CPU tanh kernel runs
    7-10x slower than its sigmoid on our benchmark machine (bench/README.md)."""
    return torch.sigmoid(x * 2).mul(2).sub_(1)


def lstm_cell(gates: torch.Tensor, c: torch.Tensor, extra: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.LSTMCell's pointwise part, in fp32: gates (B, 4H) in order i, f, g, o, plus
    ``extra`` (B, 4H) if given (a step's precomputed input projection); c (B, H) -> (h', c'), where

        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),  h' = σ(o) ⊙ tanh(c'),

    On the CPU one pass of fused C forward and one backward (``nmtkit.native``, keeping σ(i), σ(f),
    tanh(g), σ(o) besides c and c'), reading fp32 or bf16 gates (the step products' output under
    autocast) and giving their gradient back in the same dtype, so no casts run around the cell;
    otherwise PyTorch ops in fp32 with tanh(g) = 2σ(2g) − 1, so that one sigmoid covers all four
    gates, and a hand-written backward (``_LSTMCell``) that keeps only σ(gates) besides c and c',
    not autograd's seven (B, H) tensors.
    """
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gates, extra, c))
    if native.applies(gates, extra, dtypes=native.EITHER) and native.applies(c):
        return _NativeLSTMCell.apply(gates, extra, c) if grad else native.lstm_forward(gates, extra, c)[:2]
    gates = wide(gates) if extra is None else wide(gates) + wide(extra)
    if grad:
        return _LSTMCell.apply(gates, c)
    return _lstm_pointwise(gates, c)[:2]


class _NativeLSTMCell(Function):
    """``lstm_cell`` through the fused C kernels (the equations: nmtkit/native.c). The gradient of
    gates and extra, ∂/∂(gates + extra), is one tensor: made in bf16 when both inputs are bf16,
    else in fp32 (and cast for a bf16 one)."""

    @staticmethod
    def forward(ctx, gates, extra, c):
        ctx.set_materialize_grads(False)  # an output no gradient reached stays None, not zeros
        h_new, c_new, s = native.lstm_forward(gates, extra, c)
        ctx.save_for_backward(s, c, c_new)
        ctx.dtypes = gates.dtype, None if extra is None else extra.dtype
        return h_new, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        s, c, c_new = ctx.saved_tensors
        dtypes = {t for t in ctx.dtypes if t is not None}
        d_gates, d_c = native.lstm_backward(dh, dc, s, c, c_new, dtypes.pop() if len(dtypes) == 1 else torch.float32)
        d_extra = d_gates.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_gates.to(ctx.dtypes[0]), d_extra, d_c


def _lstm_pointwise(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h', c', σ(gates with g doubled)) for ``lstm_cell``."""
    scale = _gate_scale(c.size(-1), gates.dtype, gates.device)  # (4H,): 1 for i, f, o; 2 for g
    s = torch.sigmoid(gates * scale)  # (B, 4H)
    i, f, g2, o = s.chunk(4, dim=1)  # g2 = σ(2g), tanh(g) = 2 g2 − 1
    c_new = torch.addcmul(f * c, i, g2.mul(2).sub_(1))
    return o * tanh(c_new), c_new, s


class _LSTMCell(Function):
    """``lstm_cell`` with a hand-written backward. With t = tanh(c'), dc̃ = dc' + dh' ⊙ σ(o) ⊙ (1 − t²):
    d(i, f, g, o) = (dc̃ ⊙ tanh(g) ⊙ σ'(i), dc̃ ⊙ c ⊙ σ'(f), dc̃ ⊙ σ(i) ⊙ (1 − tanh²(g)), dh' ⊙ t ⊙ σ'(o))
    with σ' = σ(1 − σ), and dc = dc̃ ⊙ σ(f); tanh(g) and t are recomputed from what is kept."""

    @staticmethod
    def forward(ctx, gates, c):
        h_new, c_new, s = _lstm_pointwise(gates, c)
        ctx.save_for_backward(s, c, c_new)
        return h_new, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        s, c, c_new = ctx.saved_tensors
        i, f, g2, o = s.chunk(4, dim=1)
        t = tanh(c_new)
        dc_total = torch.addcmul(dc, dh * o, 1 - t * t)  # (B, H)
        tanh_g = g2 * 2 - 1
        d_gates = torch.cat([dc_total * tanh_g, dc_total * c, dc_total * i, dh * t], 1)  # (B, 4H) ∂/∂(σ, tanh)
        slope = s * (1 - s)  # σ' for i, f, o
        slope[:, 2 * c.size(1):3 * c.size(1)] = 1 - tanh_g * tanh_g  # tanh' for g
        return d_gates.mul_(slope), dc_total * f


@functools.cache
def _gate_scale(H: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1…1, 1…1, 2…2, 1…1] (4H,): scales the g block of LSTM gates, made once per shape (as a
    normal tensor even when first asked for under inference_mode, so that training can use it)."""
    with torch.inference_mode(False):
        scale = torch.ones(4, H, dtype=dtype, device=device)
        scale[2] = 2.0
    return scale.view(-1)


def gru_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, h: torch.Tensor, extra: torch.Tensor | None = None
             ) -> torch.Tensor:
    """torch.nn.GRUCell's pointwise part, in fp32, with x = x_gates (+ ``extra``, a step's
    precomputed input projection): r, z = σ(x_r + h_r), σ(x_z + h_z); n = tanh(x_n + r ⊙ h_n);
    h' = (1 − z) ⊙ n + z ⊙ h. On the CPU in fp32 one fused C pass forward and one backward
    (``nmtkit.native``); otherwise PyTorch ops under autograd."""
    x_gates, h_gates = wide(x_gates), wide(h_gates)
    extra = None if extra is None else wide(extra)
    if native.applies(x_gates, extra, h_gates, h):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_gates, extra, h_gates, h)):
            return _NativeGRUCell.apply(x_gates, extra, h_gates, h)
        return native.gru_forward(x_gates, extra, h_gates, h)[0]
    if extra is not None:
        x_gates = x_gates + extra
    xr, xz, xn = x_gates.chunk(3, dim=1)
    hr, hz, hn = h_gates.chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = tanh(torch.addcmul(xn, r, hn))
    return torch.lerp(n, h, z)


class _NativeGRUCell(Function):
    """``gru_cell`` through the fused C kernels (the equations: nmtkit/native.c)."""

    @staticmethod
    def forward(ctx, x_gates, extra, h_gates, h):
        h_new, s = native.gru_forward(x_gates, extra, h_gates, h)
        ctx.save_for_backward(s, h_gates, h)
        return h_new

    @staticmethod
    def backward(ctx, dh):
        s, h_gates, h = ctx.saved_tensors
        d_x, d_hg, d_h = native.gru_backward(dh, s, h_gates, h)  # d_x: ∂/∂(x_gates + extra), the same for both
        return d_x, (d_x if ctx.needs_input_grad[1] else None), d_hg, d_h


TOPK_BLOCK = 64


def topk_rows(x: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=1) for x (N, V): the same values, sorted descending, and their indices.

    torch's CPU topk costs ~1 ns per element and thread whatever k is (1.3 ms for the beam's
    (160, 10000) log-probabilities, 2 threads), where a row maximum costs ~0.03 ns. So: the maxima of
    blocks of ``block`` columns, the k blocks with the largest maxima, and topk over those k·block
    candidates (plus the columns past the last whole block). Exact: a block holding one of the row's
    k largest values has a maximum at least the k-th largest value, and fewer than k blocks can have
    a larger one, so the k blocks chosen hold k values that are the row's k largest (with ties,
    the same values; which of several equal entries is returned may differ, as torch leaves open).
    Rows shorter than 4·k blocks (and non-CPU tensors) go to torch.topk.
    """
    N, V = x.shape
    blocks = V // block
    if blocks < 4 * k or x.device.type != "cpu":
        return x.topk(k, dim=1)
    whole = blocks * block
    grid = x.contiguous()[:, :whole].view(N, blocks, block)
    chosen = grid.amax(2).topk(k, dim=1).indices  # (N, k) blocks
    cand = grid[torch.arange(N).unsqueeze(1), chosen].view(N, k * block)  # (N, k·block)
    index = (chosen.unsqueeze(2) * block + torch.arange(block)).view(N, k * block)  # their columns
    if whole < V:
        cand = torch.cat([cand, x[:, whole:]], 1)
        index = torch.cat([index, torch.arange(whole, V).expand(N, -1)], 1)
    values, pos = cand.topk(k, dim=1)
    return values, index.gather(1, pos)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x (B, S, ...) within its length; padding stays at the end."""
    S = x.size(1)
    pos = torch.arange(S, device=x.device).unsqueeze(0)  # (1, S)
    rev = lengths.to(x.device).unsqueeze(1) - 1 - pos  # (B, S)
    return _Reverse.apply(x, torch.where(rev >= 0, rev, pos))


class _Reverse(Function):
    """x.gather(1, index) for an index (B, S) that is its own inverse (a reversal within lengths),
    so the gradient is the gradient gathered the same way; keeps only the index, where autograd's
    gather would keep x."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _gather_rows(grad, index), None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y[b, s] = x[b, index[b, s]] for x (B, S, ...), index (B, S): x.gather(1, index expanded),
    done as one index_select of whole rows of the (B·S, ...) view (a copy per row, not an index
    per element: 9-30x faster on the encoder's (64, 50, 1024) inputs, bench/README.md)."""
    B, S = index.shape
    flat = (index + torch.arange(B, device=index.device).unsqueeze(1) * S).view(-1)  # (B·S,)
    return x.reshape(B * S, -1).index_select(0, flat).view(x.shape)


def lstm_sequence(rnn: torch.nn.LSTM, x: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """What ``rnn(pack_padded_sequence(x, lengths))`` followed by ``pad_packed_sequence`` computes,
    for training: x (B, S, In) batch-first -> out (B, S, D·H) (zeros at padding), (h_n, c_n) each
    (L·D, B, H) in nn.LSTM's order, with the same parameters.

    Why: on CPU, PyTorch's packed-sequence LSTM backward is a per-step loop that zero-fills and
    accumulates the gradient of the whole (tokens, 4H) input projection at every step. Here each
    layer's input projection is one matmul for all steps and both directions, the backward
    direction reads its input reversed within each length, both directions step together as one
    batched matmul whose weight gradient is deferred (SharedLinear), states freeze past each
    sentence's end, and the gates' pointwise part runs in fp32. Dropout between layers as nn.LSTM.
    """
    B, S, _ = x.shape
    D, H, L = (2 if rnn.bidirectional else 1), rnn.hidden_size, rnn.num_layers
    dtype = compute_dtype(x.dtype, x.device.type)
    lengths = lengths.to(x.device)
    valid = torch.arange(S, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
    first_ragged = int(lengths.min())  # from this step on, some sentences have ended
    h_n, c_n, inp = [], [], x
    for layer in range(L):
        sfx = [f"_l{layer}", f"_l{layer}_reverse"][:D]
        w_ih = torch.cat([getattr(rnn, "weight_ih" + s) for s in sfx], 0)  # (D·4H, In)
        bias = torch.cat([getattr(rnn, "bias_ih" + s) + getattr(rnn, "bias_hh" + s) for s in sfx], 0)
        proj = linear(inp.to(dtype), w_ih.to(dtype), bias.to(dtype))  # (B, S, D·4H)
        parts = list(proj.split(4 * H, -1))  # one split, not D slices: their backward is one cat, not
        if D == 2:                             # D zero-filled (B, S, D·4H) tensors summed
            parts[1] = reverse_padded(parts[1], lengths)
        steps = torch.stack(parts, 0).unbind(2)  # S x (D, B, 4H)
        w_hh = torch.stack([getattr(rnn, "weight_hh" + s) for s in sfx], 0).to(dtype)  # (D, 4H, H)
        recur = SharedLinear(w_hh)
        h = x.new_zeros(D, B, H, dtype=torch.promote_types(x.dtype, torch.float32))
        c = torch.zeros_like(h)
        outs = []
        for t in range(S):
            pre = steps[t].view(D * B, 4 * H)
            if t == 0:  # h_0 = 0
                h_new, c_new = lstm_cell(pre, c.view(D * B, H))
            else:
                h_new, c_new = lstm_cell(recur(h).view(D * B, 4 * H), c.view(D * B, H), pre)
            h_new, c_new = h_new.view(D, B, H), c_new.view(D, B, H)
            if t >= first_ragged:
                keep = valid[:, t].view(1, B, 1)
                h_new, c_new = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        out = torch.stack(outs, 2)  # (D, B, S, H)
        dirs = [out[0]] + ([reverse_padded(out[1], lengths)] if D == 2 else [])
        inp = torch.cat(dirs, -1) * valid.unsqueeze(-1)  # (B, S, D·H)
        h_n.extend(h.unbind(0))
        c_n.extend(c.unbind(0))
        if layer < L - 1 and rnn.dropout and rnn.training:
            inp = dropout(inp, rnn.dropout)
    return inp, (torch.stack(h_n), torch.stack(c_n))
