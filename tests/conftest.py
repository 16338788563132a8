"""Shared fixtures: a synthetic 'reverse the sentence' task with a known word alignment.

Source: 3-5 distinct words from a 24-word vocabulary; target: the same words reversed and
renamed (w7 -> V7). A word-level sentencepiece model makes one token per word, so target word j
is aligned to source word n-1-j exactly (distinct words: no second, equally good link).

The sizes are tuned so that ``small_config`` learns the task to >= 95% exact match in a few
seconds of one CPU core with every attention mechanism (tests/test_learning.py); a larger
vocabulary keeps attention sharp (annotations cannot cheaply carry their neighbours' words),
longer sentences make RNNencdec and location attention much slower to learn.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmtkit.config import Config
from nmtkit.data import PreprocessOptions, preprocess

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # tiny models: extra intra-op threads only add synchronisation


def reverse_pairs(n: int, seed: int, vocab: int = 24, lengths: tuple[int, int] = (3, 5)) -> list[tuple[str, str]]:
    """n (source, target) pairs: distinct source words w0..w{vocab-1}, target reversed as V*."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = rng.sample(range(vocab), rng.randint(*lengths))  # distinct: one unambiguous alignment
        pairs.append((" ".join(f"w{w}" for w in words), " ".join(f"V{w}" for w in reversed(words))))
    return pairs


def write_parallel(prefix: Path, pairs: list[tuple[str, str]], src: str = "src", tgt: str = "tgt") -> None:
    Path(f"{prefix}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    Path(f"{prefix}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture(scope="session")
def reverse_corpus(tmp_path_factory) -> Path:
    """Raw text: train (2000 pairs), valid (100), test (200) as PREFIX.src / PREFIX.tgt."""
    root = tmp_path_factory.mktemp("reverse")
    for split, n, seed in (("train", 2000, 1), ("valid", 100, 2), ("test", 200, 3)):
        write_parallel(root / split, reverse_pairs(n, seed))
    return root


@pytest.fixture(scope="session")
def reverse_data(reverse_corpus, tmp_path_factory) -> Path:
    """The reverse corpus preprocessed with word-level (one token per word) separate vocabularies."""
    out = tmp_path_factory.mktemp("reverse-data")
    preprocess(PreprocessOptions(src="src", tgt="tgt", train=str(reverse_corpus / "train"),
                                 valid=str(reverse_corpus / "valid"), test=str(reverse_corpus / "test"),
                                 out=out, vocab_size=40, joint=False, model_type="word", force=True),
               log=lambda m: None)
    return out


def small_config(**model) -> Config:
    """A small, fast model for the synthetic task; keyword arguments override model fields."""
    config = Config()
    config.model.layers, config.model.hidden_size, config.model.embed_size = 1, 64, 32
    config.model.dropout = 0.0
    config.train.batch_tokens, config.train.lr, config.train.epochs = 600, 0.01, 14
    config.train.lr_decay = 0.7  # the 100-pair validation set is noisy: halving on every bump stalls
    config.train.valid_bleu, config.train.log_every = False, 10_000
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def run_cli(*args: str, input: str | bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m nmtkit ARGS` as a user would (this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    text = not isinstance(input, bytes)
    result = subprocess.run([sys.executable, "-m", "nmtkit", *args], input=input, capture_output=True,
                            text=text, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"nmtkit {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def trained_reverse(reverse_data, tmp_path_factory) -> Path:
    """A luong-general model trained on the reverse task (run directory with best.pt, last.pt)."""
    from nmtkit.train import train

    run = tmp_path_factory.mktemp("reverse-run")
    train(reverse_data, run, small_config(), log=lambda m: None)
    return run


def untrained_payload(data_dir: Path, config: Config | None = None, seed: int = 0) -> dict:
    """A checkpoint payload (no optimizer) for an untrained model on ``data_dir``'s vocabularies."""
    import json

    from nmtkit.model import build_model

    config = config or small_config()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    config.model.src_vocab_size, config.model.tgt_vocab_size = manifest["src_vocab_size"], manifest["tgt_vocab_size"]
    config.model = config.model.resolved()
    torch.manual_seed(seed)
    model = build_model(config.model)
    src, tgt = manifest["src"], manifest["tgt"]
    return {"config": config.to_dict(),
            "tokenizers": {"src": (data_dir / f"spm.{src}.model").read_bytes(),
                           "tgt": (data_dir / f"spm.{tgt}.model").read_bytes()},
            "model": model.state_dict(), "train_state": {}}


@pytest.fixture(scope="session")
def untrained_checkpoint(reverse_data, tmp_path_factory) -> Path:
    """An untrained small model on the reverse task's vocabularies, saved as a real checkpoint."""
    from nmtkit.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    save_checkpoint(path, untrained_payload(reverse_data))
    return path


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (small models on a shared 2-core machine run faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
