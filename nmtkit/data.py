"""Binarized parallel data and length-bucketed token batches.

`preprocess` turns raw parallel text into, per split and language, a flat int32 array of token
ids (``{split}.{lang}.npy``) and int64 offsets (``{split}.{lang}.off.npy``); both load
memory-mapped. ``manifest.json`` records counts and what was filtered, and the sentencepiece
model(s) sit beside them.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nmtkit.errors import NmtkitError, UsageError
from nmtkit.tokenizer import BOS, EOS, PAD, Tokenizer

DATA_FORMAT_VERSION = 1
MANIFEST_KEYS = ("src", "tgt", "src_vocab_size", "tgt_vocab_size", "max_len", "splits")


# ----------------------------------------------------------------------------- reading text

def find_text(prefix: str, lang: str) -> Path:
    """``PREFIX.LANG`` or ``PREFIX.LANG.gz``; a clear error when neither exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise NmtkitError(f"file not found: {prefix}.{lang} (nor {prefix}.{lang}.gz)")


# Unicode line breaks that sentencepiece's normalisation keeps (NEL) or might: inside a line they
# become spaces, so no subword can hold one and no translation can be split by str.splitlines().
INNER_LINE_BREAKS = str.maketrans({"\x85": " ", "\u2028": " ", "\u2029": " "})


def read_lines(path: Path, errors: str = "strict") -> list[str]:
    """All lines of a (possibly gzipped) UTF-8 file, newline stripped, Unicode line breaks inside
    a line (U+0085, U+2028, U+2029) turned into spaces.

    Invalid UTF-8 raises an error naming the file and line, unless ``errors='replace'``.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8", errors=errors).rstrip("\r\n").translate(INNER_LINE_BREAKS))
                except UnicodeDecodeError as e:
                    raise NmtkitError(
                        f"{path}:{number}: invalid UTF-8 at byte {e.start} "
                        f"(fix the file or pass --errors replace)") from None
    except (OSError, EOFError) as e:
        raise NmtkitError(f"cannot read {path}: {e}") from None
    return lines


def read_parallel(src: Path, tgt: Path, errors: str = "strict") -> tuple[list[str], list[str]]:
    src_lines, tgt_lines = read_lines(src, errors), read_lines(tgt, errors)
    if len(src_lines) != len(tgt_lines):
        raise NmtkitError(
            f"parallel files differ in length: {src} has {len(src_lines)} lines, "
            f"{tgt} has {len(tgt_lines)}")
    return src_lines, tgt_lines


# ----------------------------------------------------------------------------- preprocess

@dataclass
class PreprocessOptions:
    src: str
    tgt: str
    train: str
    valid: str
    out: Path
    test: str | None = None
    vocab_size: int = 8000
    joint: bool = True
    model_type: str = "unigram"
    max_len: int = 100
    errors: str = "strict"
    force: bool = False


def preprocess(opts: PreprocessOptions, log=print) -> dict:
    """Train tokenizer(s), encode, filter empty/overlong pairs, binarize; returns the manifest."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if (out / "manifest.json").exists() and not opts.force:
        raise UsageError(f"{out} already holds preprocessed data; pass --force to overwrite it")
    if opts.model_type not in ("unigram", "bpe", "word", "char"):
        raise UsageError(f"unknown model type '{opts.model_type}'; choose one of: unigram, bpe, word, char")
    if opts.errors not in ("strict", "replace"):
        raise UsageError("--errors is 'strict' or 'replace'")
    splits = {"train": opts.train, "valid": opts.valid}
    if opts.test:
        splits["test"] = opts.test
    text, paths = {}, {}
    for split, prefix in splits.items():
        src_path, tgt_path = find_text(prefix, opts.src), find_text(prefix, opts.tgt)
        text[split] = read_parallel(src_path, tgt_path, opts.errors)
        paths[split] = (src_path, tgt_path)
        log(f"read {split}: {len(text[split][0])} lines from {src_path}, {tgt_path}")

    train_src, train_tgt = text["train"]
    for lines, path in ((train_src, paths["train"][0]), (train_tgt, paths["train"][1])):
        if not any(line.strip() for line in lines):
            raise NmtkitError(f"{path}: no training text (the file is empty or holds only blank lines)")
    try:
        if opts.joint:
            src_tok = tgt_tok = Tokenizer.train(train_src + train_tgt, opts.vocab_size, opts.model_type)
        else:
            src_tok = Tokenizer.train(train_src, opts.vocab_size, opts.model_type)
            tgt_tok = Tokenizer.train(train_tgt, opts.vocab_size, opts.model_type)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NmtkitError(f"cannot train the subword model on {paths['train'][0]}, {paths['train'][1]}: "
                          f"{first[:200]}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NmtkitError(f"cannot create --out directory {out}: {e.strerror or e}") from None
    (out / f"spm.{opts.src}.model").write_bytes(src_tok.model_proto)
    (out / f"spm.{opts.tgt}.model").write_bytes(tgt_tok.model_proto)

    manifest = {
        "format_version": DATA_FORMAT_VERSION, "src": opts.src, "tgt": opts.tgt,
        "joint": opts.joint, "model_type": opts.model_type, "max_len": opts.max_len,
        "src_vocab_size": len(src_tok), "tgt_vocab_size": len(tgt_tok), "splits": {},
    }
    for split, (src_lines, tgt_lines) in text.items():
        src_ids, tgt_ids = src_tok.encode_batch(src_lines), tgt_tok.encode_batch(tgt_lines)
        keep, empty, long = [], 0, 0
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
            if not s or not t:
                empty += 1
            elif len(s) > opts.max_len or len(t) > opts.max_len:
                long += 1
            else:
                keep.append(i)
        if not keep and split in ("train", "valid"):
            raise NmtkitError(
                f"{paths[split][0]}, {paths[split][1]}: no {split} pair left after filtering "
                f"({empty} with an empty side, {long} longer than --max-len {opts.max_len} subwords)")
        _write_side(out, split, opts.src, [src_ids[i] for i in keep])
        _write_side(out, split, opts.tgt, [tgt_ids[i] for i in keep])
        (out / f"{split}.ref.{opts.tgt}").write_text(
            "".join(tgt_lines[i] + "\n" for i in keep), encoding="utf-8")
        manifest["splits"][split] = {
            "lines": len(src_lines), "kept": len(keep), "filtered_empty": empty,
            "filtered_too_long": long,
            "src_tokens": int(sum(len(src_ids[i]) for i in keep)),
            "tgt_tokens": int(sum(len(tgt_ids[i]) for i in keep)),
        }
        log(f"{split}: kept {len(keep)} of {len(src_lines)} pairs "
            f"({empty} empty, {long} longer than {opts.max_len} tokens)")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _write_side(out: Path, split: str, lang: str, seqs: list[list[int]]) -> None:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    np.save(out / f"{split}.{lang}.npy", flat)
    np.save(out / f"{split}.{lang}.off.npy", offsets)


# ----------------------------------------------------------------------------- loading

class DataDir:
    """A preprocessed data directory: manifest, tokenizers and binarized splits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise NmtkitError(f"{self.path} is not a preprocessed data directory (no manifest.json); "
                              f"run 'nmtkit preprocess' first")
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NmtkitError(f"{manifest}: corrupt manifest ({e})") from None
        if not isinstance(self.manifest, dict):
            raise NmtkitError(f"{manifest}: corrupt manifest (not a JSON object)")
        version = self.manifest.get("format_version")
        if version != DATA_FORMAT_VERSION:
            raise NmtkitError(f"{self.path}: data format version {version}, this nmtkit reads "
                              f"version {DATA_FORMAT_VERSION}; run 'nmtkit preprocess' again")
        missing = [k for k in MANIFEST_KEYS if k not in self.manifest]
        if missing:
            raise NmtkitError(f"{manifest}: corrupt manifest (missing {', '.join(missing)})")
        self.src, self.tgt = self.manifest["src"], self.manifest["tgt"]

    def tokenizer_bytes(self, side: str) -> bytes:
        path = self.path / f"spm.{side}.model"
        try:
            return path.read_bytes()
        except OSError as e:
            raise NmtkitError(f"cannot read {path}: {e.strerror or e}") from None

    def split(self, name: str) -> "ParallelData":
        return ParallelData(self.path, name, self.src, self.tgt)

    def references(self, split: str) -> list[str]:
        return read_lines(self.path / f"{split}.ref.{self.tgt}")


class ParallelData:
    """One binarized split, memory-mapped."""

    def __init__(self, root: Path, split: str, src: str, tgt: str) -> None:
        try:
            self.src_tokens = np.load(root / f"{split}.{src}.npy", mmap_mode="r")
            self.src_off = np.load(root / f"{split}.{src}.off.npy")
            self.tgt_tokens = np.load(root / f"{split}.{tgt}.npy", mmap_mode="r")
            self.tgt_off = np.load(root / f"{split}.{tgt}.off.npy")
        except (OSError, ValueError) as e:
            raise NmtkitError(f"{root}: cannot load split '{split}' ({e})") from None
        self.src_lens = np.diff(self.src_off)
        self.tgt_lens = np.diff(self.tgt_off)

    def __len__(self) -> int:
        return len(self.src_lens)

    def source(self, i: int) -> np.ndarray:
        return self.src_tokens[self.src_off[i]:self.src_off[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt_tokens[self.tgt_off[i]:self.tgt_off[i + 1]]


# ----------------------------------------------------------------------------- batching

@dataclass
class Batch:
    """Padded tensors for one batch (teacher forcing: tgt_in = BOS y, tgt_out = y EOS)."""

    src: torch.Tensor  # (B, S) long
    src_lens: torch.Tensor  # (B,) long
    tgt_in: torch.Tensor  # (B, T) long
    tgt_out: torch.Tensor  # (B, T) long
    indices: np.ndarray  # (B,) positions in the split

    @property
    def target_tokens(self) -> int:
        return int((self.tgt_out != PAD).sum())


def pad(seqs: list, value: int = PAD) -> torch.Tensor:
    """(B, max len) long tensor of right-padded sequences."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
    return out


def collate(data: ParallelData, indices: np.ndarray) -> Batch:
    srcs = [data.source(i) for i in indices]
    tgts = [data.target(i) for i in indices]
    return Batch(
        src=pad(srcs),
        src_lens=torch.tensor([len(s) for s in srcs], dtype=torch.long),
        tgt_in=pad([np.concatenate(([BOS], t)) for t in tgts]),
        tgt_out=pad([np.concatenate((t, [EOS])) for t in tgts]),
        indices=np.asarray(indices),
    )


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int,
                  seed: int = 0, epoch: int = 0, shuffle: bool = True, max_sents: int = 0) -> list[np.ndarray]:
    """Length-bucketed batches: sentences sorted by length, cut so that padded size
    (sentences x longest side + 1) stays within ``batch_tokens`` and, when ``max_sents`` > 0,
    a batch holds at most ``max_sents`` sentences; batch order shuffled.

    Deterministic in (seed, epoch), so a resumed run sees exactly the same batches.
    """
    n = len(src_lens)
    gen = np.random.default_rng([seed, epoch])
    noise = gen.permutation(n) if shuffle else np.arange(n)
    order = noise[np.lexsort((tgt_lens[noise], src_lens[noise]))]
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        size = max(int(src_lens[i]), int(tgt_lens[i])) + 1
        if pos > start and (max(longest, size) * (pos - start + 1) > batch_tokens
                            or (max_sents and pos - start >= max_sents)):
            batches.append(order[start:pos])
            start, longest = pos, 0
        longest = max(longest, size)
    if start < n:
        batches.append(order[start:])
    if shuffle:
        batches = [batches[i] for i in gen.permutation(len(batches))]
    return batches
