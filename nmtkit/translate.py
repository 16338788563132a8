"""Checkpoint + text stream -> text stream.

Exactly one output line per input line, in input order: an empty or blank line gives an empty
line, a line longer than ``max_input_len`` subwords is translated piece by piece (bounded
memory) and the pieces joined. Input is read in buffers of ``buffer_size`` lines, each sorted by
length into batches, so the first translations are written before a large input is read whole.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from nmtkit.checkpoint import LoadedModel
from nmtkit.data import pad
from nmtkit.errors import UsageError
from nmtkit.kernels import Linear, let_go, page_out
from nmtkit.model import Seq2Seq
from nmtkit.search import beam_search, greedy_search, max_lengths


@dataclass
class DecodeOptions:
    beam: int = 1
    batch_size: int = 32
    max_len_ratio: float = 2.0
    length_penalty: float = 1.0
    min_len: int = 0  # forbid EOS before this many tokens (benchmarks)
    max_input_len: int = 200  # longer inputs are translated in pieces of this many subwords
    buffer_size: int = 1024  # lines read before a buffer is sorted and translated
    precision: str = "fp32"
    quantize: str = "none"  # "int8": dynamic int8 quantization of linear and encoder RNN layers (CPU)
    max_len: int = 0  # if > 0: every output is limited to exactly this many tokens (benchmarks)

    def validate(self) -> None:
        if self.beam < 1 or self.batch_size < 1 or self.max_input_len < 1 or self.buffer_size < 1:
            raise UsageError("--beam, --batch-size, --max-input-len and --buffer-size must be at least 1")
        if self.max_len_ratio <= 0:
            raise UsageError("--max-len-ratio must be positive")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"unknown precision '{self.precision}'; choose one of: fp32, bf16")
        if self.quantize not in ("none", "int8"):
            raise UsageError(f"unknown quantization '{self.quantize}'; choose one of: none, int8")
        if self.quantize != "none" and self.precision != "fp32":
            raise UsageError("--quantize int8 runs with --precision fp32 activations; do not combine it with bf16")
        if self.min_len < 0 or self.max_len < 0:
            raise UsageError("--min-len and --max-len must not be negative")


def autocast(precision: str, device: torch.device | str = "cpu"):
    """bf16 autocast when asked for, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rows_to_bf16(module: torch.nn.Module, inputs: tuple, rows: torch.Tensor) -> torch.Tensor:
    """Forward hook: embedding rows looked up in an fp32 table, as a bf16 table would give them."""
    return rows.to(torch.bfloat16)


def prepare_for_inference(model: Seq2Seq, precision: str = "fp32", quantize: str = "none") -> Seq2Seq:
    """Make ``model`` ready for fast CPU decoding, in place (it can no longer be trained):
    eval mode, no gradients, the decoder RNN's per-layer matmuls fused into one nn.Linear each;
    ``precision='bf16'``: weights stored in bf16 (half the memory; run under ``autocast``), except
    the embedding tables, whose rows are read from the mapped checkpoint and converted per lookup;
    ``quantize='int8'``: torch.ao dynamic int8 quantization of every nn.Linear and the encoder's
    nn.LSTM/GRU (weights int8, activations quantized per batch; fbgemm VNNI kernels on x86).
    Preparing again with the same settings is a no-op; other settings raise UsageError.
    """
    wanted = (precision, quantize)
    done = getattr(model, "_inference", None)
    if done is not None:
        if done != wanted:
            raise UsageError(f"model already prepared for {done}; load the checkpoint again for {wanted}")
        return model
    model.eval()
    model.requires_grad_(False)
    model.decoder.rnn.fuse_for_inference(pack=precision == "fp32" and quantize == "none")
    if precision == "bf16":
        # embedding tables stay fp32 in the mapped file (translate_ids lets go of the rows a batch
        # read); the rows they give are converted. Everything else: one tensor at a time, so that
        # the fp32 originals (read from the checkpoint file) never all stay resident.
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        tables = {id(m.weight) for m in embeddings}
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point() and id(tensor) not in tables:
                fp32, tensor.data = tensor.data, tensor.data.to(torch.bfloat16)
                page_out(fp32)
        for module in embeddings:
            module.register_forward_hook(_rows_to_bf16)
    if quantize == "int8":
        import warnings

        from torch.ao.quantization import quantize_dynamic

        kinds = (torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU)
        for module in model.modules():  # torch.ao swaps exact nn.Linear types only
            if isinstance(module, Linear):
                module.__class__ = torch.nn.Linear
        replaced = [p for m in model.modules() if type(m) in kinds for p in m.parameters(recurse=False)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(model, set(kinds), dtype=torch.qint8, inplace=True)
        page_out(*replaced)  # the fp32 originals, read from the checkpoint file
    else:
        for module in model.modules():  # fp32 on CPU: weights in oneDNN's blocked layout, once
            if isinstance(module, Linear):
                module.pack()
    model._inference = wanted
    return model


def translate_ids(model: Seq2Seq, sources: list[list[int]], opts: DecodeOptions) -> list[list[int]]:
    """Token ids in, token ids out, same order; batches are formed from length-sorted sentences."""
    device = model.encoder.embed.weight.device  # embeddings are never quantized
    results: list[list[int]] = [[] for _ in sources]
    order = sorted((i for i, s in enumerate(sources) if s), key=lambda i: -len(sources[i]))
    for start in range(0, len(order), opts.batch_size):
        rows = order[start:start + opts.batch_size]
        src = pad([sources[i] for i in rows]).to(device)
        lengths = torch.tensor([len(sources[i]) for i in rows], device=device)
        if opts.max_len:
            limits = torch.full((len(rows),), opts.max_len, dtype=torch.long)
        else:
            limits = max_lengths(lengths.cpu(), opts.max_len_ratio)
        with torch.inference_mode(), autocast(opts.precision, device):
            if opts.beam == 1:
                outs = greedy_search(model, src, lengths, limits, opts.min_len)
            else:
                outs = beam_search(model, src, lengths, limits, opts.beam, opts.length_penalty, opts.min_len)
        for i, out in zip(rows, outs):
            results[i] = out
        if getattr(model, "_inference", None):  # prepared, so read-only: let go of the embedding rows
            # this batch read from the mapped checkpoint (else RSS grows with the vocabulary seen)
            let_go(model.encoder.embed.weight, model.decoder.embed.weight)
    return results


def translate_lines(loaded: LoadedModel, lines: Iterable[str], opts: DecodeOptions) -> Iterator[str]:
    """Translate raw lines lazily; yields exactly one detokenized line per input line, in order.

    The model is prepared for inference in place (``prepare_for_inference``) with the options'
    precision and quantization.
    """
    opts.validate()
    model = prepare_for_inference(loaded.model, opts.precision, opts.quantize)
    it = iter(lines)
    while True:
        buffer = list(itertools.islice(it, opts.buffer_size))
        if not buffer:
            return
        pieces: list[list[int]] = []  # every piece of every line
        owner: list[int] = []  # the buffer line each piece belongs to
        for n, line in enumerate(buffer):
            ids = loaded.src_tok.encode(line) if line.strip() else []
            for start in range(0, len(ids), opts.max_input_len):
                pieces.append(ids[start:start + opts.max_input_len])
                owner.append(n)
        outputs = translate_ids(model, pieces, opts)
        texts: list[list[str]] = [[] for _ in buffer]
        for n, out in zip(owner, outputs):
            texts[n].append(loaded.tgt_tok.decode(out))
        for parts in texts:
            yield " ".join(p for p in parts if p)
