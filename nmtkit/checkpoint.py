"""One-file checkpoints: plain Python data and tensors only, so ``torch.load(weights_only=True)``
reads them and a checkpoint cannot execute code. Saved atomically (temporary file + rename).

Contents: ``format_version``, ``config`` (resolved, plain dicts), ``tokenizers`` (sentencepiece
model bytes per side), ``vocab`` (pieces per side), ``model`` (state dict), and for training
``optimizer`` and ``train_state``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from nmtkit.config import Config
from nmtkit.errors import NmtkitError
from nmtkit.model import Seq2Seq, build_model, build_model_for_loading
from nmtkit.tokenizer import Tokenizer

FORMAT_VERSION = 1
REQUIRED = ("format_version", "config", "tokenizers", "model")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NmtkitError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint; every failure is one clear NmtkitError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise NmtkitError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no read-all copy
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            AttributeError, TypeError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NmtkitError(f"{path}: not a readable nmtkit checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise NmtkitError(f"{path}: not an nmtkit checkpoint (missing {', '.join(REQUIRED)})")
    version = ckpt["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NmtkitError(f"{path}: checkpoint format {version} is newer than this nmtkit reads "
                          f"({FORMAT_VERSION}); upgrade nmtkit")
    return migrate(ckpt)


def migrate(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint up to FORMAT_VERSION (the one place format changes are handled)."""
    # version 1 is the first format: nothing to migrate yet.
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
            raise NmtkitError(f"{path}: {e}") from None
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise NmtkitError(f"{path}: checkpoint does not match its config ({str(e)[:200]})") from None
        self.model.eval()
        self.path = Path(path)
