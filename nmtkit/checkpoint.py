"""One-file checkpoints: plain Python data and tensors only, so ``torch.load(weights_only=True)``
reads them and a checkpoint cannot execute code. Saved atomically (temporary file + rename).

Contents: ``format_version``, ``config`` (resolved, plain dicts), ``tokenizers`` (sentencepiece
model bytes per side), ``vocab`` (pieces per side), ``model`` (state dict), and for training
``optimizer`` and ``train_state``.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from nmtkit.config import Config
from nmtkit.errors import NmtkitError
from nmtkit.model import Seq2Seq, build_model, build_model_for_loading
from nmtkit.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: "vocab" holds one newline-joined string per side (was a list of pieces)
REQUIRED = ("format_version", "config", "tokenizers", "model")


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (in dicts, lists, tuples) on the CPU; CPU tensors are not copied."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(value) for value in obj)
    return obj


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash mid-write leaves the old file intact.

    Tensors are written as CPU tensors (a GPU-trained checkpoint loads anywhere, also with plain
    ``torch.load``). The data goes to a temporary file in the same directory, is flushed and
    fsynced, then renamed over ``path`` (and the directory fsynced). Any failure removes the
    temporary file; an OSError (disk full, permissions) becomes one NmtkitError naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **_on_cpu(payload)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = " (the previous checkpoint is intact)" if path.exists() else ""
            raise NmtkitError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; every failure is one clear NmtkitError naming the file.

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain data, so a file
    carrying pickled Python objects is rejected before any of its code could run.
    """
    path = Path(path)
    if path.is_dir():
        raise NmtkitError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise NmtkitError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no read-all copy
    except (PermissionError, InterruptedError) as e:
        raise NmtkitError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except OSError as e:
        if e.errno == errno.EIO:
            raise NmtkitError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
        raise NmtkitError(f"{path}: not a readable nmtkit checkpoint (truncated or corrupt: "
                          f"{e.strerror or _load_error_detail(e)})") from None
    except Exception as e:  # noqa: BLE001 -- whatever a corrupt file makes torch raise
        text = str(e)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        if unsafe:
            raise NmtkitError(f"{path}: refused: holds a pickled Python object ({unsafe.group(1)}), not only "
                              f"tensors and plain data; nmtkit loads checkpoints with weights_only=True") from None
        raise NmtkitError(f"{path}: not a readable nmtkit checkpoint (truncated or corrupt: "
                          f"{_load_error_detail(e)})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise NmtkitError(f"{path}: not an nmtkit checkpoint (it lacks {', '.join(REQUIRED)})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise NmtkitError(f"{path}: unknown checkpoint format {version!r}")
    if version > FORMAT_VERSION:
        raise NmtkitError(f"{path}: checkpoint format {version} is newer than this nmtkit reads "
                          f"({FORMAT_VERSION}); upgrade nmtkit")
    return migrate(ckpt)


def _load_error_detail(e: Exception) -> str:
    """The informative part of torch.load's (often long) error message, one short line."""
    text = str(e)
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if detail:
        line = detail.group(1)
    elif "Weights only load failed" in text:
        line = "not a pickle that weights_only=True can read"
    else:
        lines = [part.strip() for part in text.strip().splitlines() if part.strip()]
        line = lines[0] if lines else type(e).__name__
    line = re.split(r"(?<=[^.])\. ", line, maxsplit=1)[0].rstrip(".")  # the first sentence
    return line[:160]


def join_vocab(pieces: list[str]) -> str:
    """A vocabulary as stored in a checkpoint: its pieces in id order, one per line."""
    return "\n".join(pieces)


def migrate(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint up to FORMAT_VERSION (the one place format changes are handled)."""
    if ckpt["format_version"] < 2 and isinstance(ckpt.get("vocab"), dict):
        # A list of 10k strings took torch's weights-only unpickler 55 ms per load (one string: 1 ms).
        ckpt["vocab"] = {side: join_vocab(pieces) for side, pieces in ckpt["vocab"].items()}
    ckpt["format_version"] = FORMAT_VERSION
    return ckpt


class LoadedModel:
    """A checkpoint made ready to use: model in eval mode, tokenizers, config."""

    def __init__(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path)
        try:
            self.config = Config.from_dict(ckpt["config"], f"{path}: config")
            self.model: Seq2Seq = build_model_for_loading(self.config.model)
            self.model.load_state_dict(ckpt["model"], assign=True)
            self.src_tok = Tokenizer(ckpt["tokenizers"]["src"])
            self.tgt_tok = Tokenizer(ckpt["tokenizers"]["tgt"])
        except NmtkitError as e:
            raise NmtkitError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 -- a damaged checkpoint can fail in many ways
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NmtkitError(f"{path}: checkpoint does not match its config ({first[:200]})") from None
        self.model.eval()
        self.path = Path(path)
