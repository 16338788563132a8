"""The training loop: token-bucketed batches, Adam/SGD, gradient clipping, validation
(perplexity and greedy BLEU), learning-rate decay on plateau, early stopping, checkpoints
(``last.pt`` every validation, ``best.pt`` on the best validation perplexity) and a JSONL
metrics log. ``resume`` continues from ``last.pt`` at the same position in the data.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from nmtkit.checkpoint import load_checkpoint, save_checkpoint
from nmtkit.config import Config
from nmtkit.data import DataDir, ParallelData, collate, token_batches
from nmtkit.errors import NmtkitError, UsageError
from nmtkit.model import Seq2Seq, build_model, sequence_loss
from nmtkit.score import bleu
from nmtkit.tokenizer import Tokenizer
from nmtkit.translate import DecodeOptions, autocast, translate_ids


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints so that a resumed run continues exactly."""

    epoch: int = 0
    batch: int = 0  # batches of this epoch already done
    step: int = 0  # optimizer updates
    best_ppl: float = math.inf
    bad_validations: int = 0
    lr: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_config(config: Config, data: DataDir) -> Config:
    """Fill in what comes from the data (vocabulary sizes, location's maximum length); validate."""
    manifest = data.manifest
    config.model.src_vocab_size = manifest["src_vocab_size"]
    config.model.tgt_vocab_size = manifest["tgt_vocab_size"]
    if config.model.attention == "luong-location" and not config.model.max_source_len:
        config.model.max_source_len = manifest["max_len"]
    config.model = config.model.resolved()
    config.validate()
    return config


def make_optimizer(model: Seq2Seq, config: Config) -> torch.optim.Optimizer:
    # fused: one multi-tensor kernel per step instead of ~10 passes over all parameters
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if config.train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.train.lr, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=config.train.lr, fused=fused)


class Trainer:
    """Owns model, optimizer, data and run directory for one training run."""

    def __init__(self, data_dir: str | Path, save_dir: str | Path, config: Config,
                 resume: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.data = DataDir(data_dir)
        self.save_dir = Path(save_dir)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self.state = TrainState()
        last = self.save_dir / "last.pt"
        ckpt = None
        if resume:
            if not last.is_file():
                raise UsageError(f"--resume: no {last} to resume from")
            ckpt = load_checkpoint(last)
            config = Config.from_dict(ckpt["config"], f"{last}: config")
        elif last.exists():
            raise UsageError(f"{self.save_dir} already holds a run (last.pt); pass --resume to continue it "
                             f"or choose another --save directory")
        self.config = prepare_config(config, self.data)
        torch.manual_seed(self.config.train.seed)
        random.seed(self.config.train.seed)
        self.model = build_model(self.config.model)
        self.optimizer = make_optimizer(self.model, self.config)
        self.state.lr = self.config.train.lr
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.state = TrainState(**ckpt["train_state"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(ckpt["rng"]["python"])
            self.log(f"resumed from {last} at epoch {self.state.epoch + 1}, step {self.state.step}")
        self.train_data = self.data.split("train")
        self.valid_data = self.data.split("valid")
        self.tokenizers = {side: Tokenizer(self.data.tokenizer_bytes(lang))
                           for side, lang in (("src", self.data.src), ("tgt", self.data.tgt))}
        self.metrics_path = self.save_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ steps

    def train_step(self, batch) -> tuple[float, int]:
        """Forward, backward, clip, update; returns (summed NLL, target tokens)."""
        cfg = self.config.train
        self.model.train()
        with autocast(cfg.precision):
            logits, _ = self.model(batch.src, batch.src_lens, batch.tgt_in)
        loss, nll = sequence_loss(logits, batch.tgt_out, cfg.label_smoothing)
        tokens = batch.target_tokens
        self.optimizer.zero_grad(set_to_none=True)
        (loss / tokens).backward()
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        self.optimizer.step()
        return float(nll), tokens

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation perplexity (and greedy BLEU against the raw references)."""
        self.model.eval()
        total, tokens = 0.0, 0
        data: ParallelData = self.valid_data
        for idx in token_batches(data.src_lens, data.tgt_lens, self.config.train.batch_tokens, shuffle=False,
                                 max_sents=self.config.train.batch_sents):
            batch = collate(data, idx)
            with autocast(self.config.train.precision):
                logits, _ = self.model(batch.src, batch.src_lens, batch.tgt_in)
            total += float(sequence_loss(logits, batch.tgt_out)[1])
            tokens += batch.target_tokens
        result = {"valid_ppl": math.exp(min(total / max(tokens, 1), 100.0))}
        if self.config.train.valid_bleu:
            sources = [data.source(i).tolist() for i in range(len(data))]
            opts = DecodeOptions(beam=1, batch_size=64, precision=self.config.train.precision)
            hyps = [self.tokenizers["tgt"].decode(o) for o in translate_ids(self.model, sources, opts)]
            result["valid_bleu"] = bleu(hyps, self.data.references("valid"))
        return result

    # ------------------------------------------------------------------ checkpoints and logs

    def checkpoint_payload(self, with_optimizer: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "config": self.config.to_dict(),
            "tokenizers": {side: tok.model_proto for side, tok in self.tokenizers.items()},
            "vocab": {side: tok.pieces() for side, tok in self.tokenizers.items()},
            "data": {"src": self.data.src, "tgt": self.data.tgt, "dir": str(self.data.path)},
            "model": self.model.state_dict(),
            "train_state": {**self.state.__dict__},
        }
        if with_optimizer:
            payload["optimizer"] = self.optimizer.state_dict()
            payload["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        return payload

    def write_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def end_of_validation(self, metrics: dict[str, float]) -> bool:
        """Log, decay lr, save last/best; returns True when early stopping says stop."""
        cfg = self.config.train
        record = {"epoch": self.state.epoch + 1, "step": self.state.step, "lr": self.state.lr, **metrics}
        improved = metrics["valid_ppl"] < self.state.best_ppl
        if improved:
            self.state.best_ppl = metrics["valid_ppl"]
            self.state.bad_validations = 0
        else:
            self.state.bad_validations += 1
            self.state.lr *= cfg.lr_decay
            for group in self.optimizer.param_groups:
                group["lr"] = self.state.lr
        self.state.history.append(record)
        self.write_metrics({"event": "valid", **record})
        bleu_text = f", BLEU {metrics['valid_bleu']:.2f}" if "valid_bleu" in metrics else ""
        self.log(f"epoch {record['epoch']} step {record['step']}: valid ppl {metrics['valid_ppl']:.2f}"
                 f"{bleu_text}{' (best)' if improved else ''}")
        if improved:
            save_checkpoint(self.save_dir / "best.pt", self.checkpoint_payload(with_optimizer=False))
        return bool(cfg.patience and self.state.bad_validations >= cfg.patience)

    def save_last(self) -> None:
        save_checkpoint(self.save_dir / "last.pt", self.checkpoint_payload(with_optimizer=True))

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        cfg = self.config.train
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {self.config.model.encoder} encoder, {self.config.model.decoder} decoder, "
                 f"{self.config.model.attention} attention ({self.config.model.window}); "
                 f"{n_params / 1e6:.2f}M parameters; {len(self.train_data)} training pairs")
        (self.save_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        start_time, stop = time.time(), False
        while self.state.epoch < cfg.epochs and not stop:
            batches = token_batches(self.train_data.src_lens, self.train_data.tgt_lens, cfg.batch_tokens,
                                    seed=cfg.seed, epoch=self.state.epoch, max_sents=cfg.batch_sents)
            bar = tqdm(total=len(batches), initial=self.state.batch, desc=f"epoch {self.state.epoch + 1}",
                       disable=not sys.stderr.isatty(), leave=False, unit="batch")
            window_nll, window_tokens, window_start = 0.0, 0, time.time()
            while self.state.batch < len(batches):
                nll, tokens = self.train_step(collate(self.train_data, batches[self.state.batch]))
                self.state.batch += 1
                self.state.step += 1
                window_nll, window_tokens = window_nll + nll, window_tokens + tokens
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    elapsed = time.time() - window_start
                    record = {"event": "train", "epoch": self.state.epoch + 1, "step": self.state.step,
                              "train_ppl": math.exp(min(window_nll / window_tokens, 100.0)),
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9), "lr": self.state.lr,
                              "tokens": window_tokens, "seconds": elapsed}
                    self.write_metrics(record)
                    bar.set_postfix(ppl=f"{record['train_ppl']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if not sys.stderr.isatty():
                        self.log(f"epoch {record['epoch']} step {record['step']}: train ppl "
                                 f"{record['train_ppl']:.2f}, {record['tokens_per_s']:.0f} tokens/s")
                    window_nll, window_tokens, window_start = 0.0, 0, time.time()
                if cfg.max_steps and self.state.step >= cfg.max_steps:
                    stop = True
                    break
                if cfg.valid_every and self.state.step % cfg.valid_every == 0:
                    stop = self.end_of_validation(self.validate())
                    self.save_last()
                    if stop:
                        break
            bar.close()
            if self.state.batch >= len(batches):
                self.state.epoch += 1
                self.state.batch = 0
            if not (cfg.valid_every and self.state.step % cfg.valid_every == 0):
                stop = self.end_of_validation(self.validate()) or stop
            self.save_last()
        elapsed = time.time() - start_time
        summary = {"event": "done", "steps": self.state.step, "epochs": self.state.epoch,
                   "best_valid_ppl": self.state.best_ppl, "seconds": elapsed}
        self.write_metrics(summary)
        self.log(f"done: {self.state.step} steps in {elapsed:.0f} s; best valid ppl {self.state.best_ppl:.2f}; "
                 f"checkpoints in {self.save_dir}")
        return summary


def train(data_dir: str | Path, save_dir: str | Path, config: Config, resume: bool = False,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a model on a preprocessed data directory; checkpoints go to ``save_dir``."""
    try:
        return Trainer(data_dir, save_dir, config, resume, log).run()
    except MemoryError:
        raise NmtkitError("out of memory: lower --batch-tokens or the model size") from None
