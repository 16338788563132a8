"""The training loop: token-bucketed batches, Adam/SGD, gradient clipping, validation
(perplexity and greedy BLEU), learning-rate decay on plateau, early stopping, checkpoints
(``last.pt`` at every validation and on stopping, ``best.pt`` on the best validation
perplexity, ``step-N.pt`` with ``keep_last``) and a JSONL metrics log.

Scaling out: one process, or several with ``torch.distributed`` (``torchrun -m nmtkit train`` or
``nmtkit train --nproc N``; starting and joining them: nmtkit.distributed), DDP with gloo on CPU
and NCCL on GPU. One optimizer update consumes
``world_size x update_freq`` consecutive batches of the epoch's batch list (deterministic in
(seed, epoch)); rank r takes its ``update_freq`` of them, and every micro-batch's loss is divided by
the target tokens of the whole group, so an update is the same sum whatever the split:
2 processes x update_freq 1 = 1 process x update_freq 2. Only rank 0 logs, validates and writes.

Never losing work: the dropout RNG is re-seeded from (seed, epoch, batch position) before each
micro-batch, so the same batch sees the same dropout masks whatever the number of processes and
whether or not the run was interrupted; checkpoints also carry the RNG states. ``resume`` restores
model, optimizer, learning rate, schedule state, RNG states and the position in the data, so an
interrupted and resumed run ends with the same weights as an uninterrupted one. SIGINT/SIGTERM
stop at the next update boundary after writing ``last.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nmtkit.checkpoint import join_vocab, load_checkpoint, save_checkpoint
from nmtkit.config import Config
from nmtkit.data import Batch, DataDir, ParallelData, collate, token_batches
from nmtkit.distributed import DistInfo, default_device, init_distributed, launch
from nmtkit.errors import NmtkitError, UsageError
from nmtkit.model import Seq2Seq, build_model
from nmtkit.optim import SGD, Adam, FusedOptimizer
from nmtkit.score import bleu
from nmtkit.tokenizer import BOS, Tokenizer
from nmtkit.translate import DecodeOptions, autocast, translate_ids

# train.* values that may change when a run is resumed (they do not change what has been computed)
RESUMABLE = ("epochs", "max_steps", "patience", "valid_every", "valid_bleu", "log_every", "keep_last",
             "update_freq")
STEP_CHECKPOINT = re.compile(r"step-(\d+)\.pt")


@dataclass
class TrainState:
    """Where training stands; saved in checkpoints so that a resumed run continues exactly."""

    epoch: int = 0
    batch: int = 0  # batches of this epoch already done
    step: int = 0  # optimizer updates
    best_ppl: float = math.inf  # best perplexity of the scheduled validations (drives lr decay)
    bad_validations: int = 0
    lr: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_saved_ppl: float = math.inf  # perplexity of the model in best.pt (any validation)


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


def resume_config(saved: dict[str, Any], overrides: dict[str, dict[str, Any]] | None, where: Path) -> Config:
    """The checkpoint's config with the given ``overrides`` applied: only RESUMABLE train values
    may differ from the checkpoint; any other value given must equal the saved one."""
    config = Config.from_dict(saved, f"{where}: config")
    for section, values in (overrides or {}).items():
        part = getattr(config, section)
        for key, value in values.items():
            current = getattr(part, key)
            if section == "train" and key in RESUMABLE:
                setattr(part, key, value)
            elif value != current and not (section == "model" and key == "bridge" and value == "auto"):
                flag = f"--{key.replace('_', '-')}"
                raise UsageError(f"--resume: {flag} ({section}.{key}) is {current!r} in {where}; it cannot "
                                 f"change when resuming (got {value!r}); only "
                                 f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} can")
    return config


def check_run(data_dir: str | Path, save_dir: str | Path, config: Config, resume: bool,
              overrides: dict[str, dict[str, Any]] | None = None
              ) -> tuple[DataDir, Config, dict[str, Any] | None]:
    """Everything that can be checked before training starts: data directory, run directory,
    checkpoint to resume from, config. Returns (data, resolved config, checkpoint or None)."""
    data = DataDir(data_dir)
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save {save_dir} is a file, not a directory")
    last = save_dir / "last.pt"
    ckpt = None
    if resume:
        if not last.is_file():
            raise UsageError(f"--resume: no {last} to resume from")
        ckpt = load_checkpoint(last)
        for key in ("optimizer", "train_state"):
            if key not in ckpt:
                raise NmtkitError(f"{last}: not a training checkpoint (no {key}); cannot resume from it")
        config = resume_config(ckpt["config"], overrides, last)
    elif last.exists():
        raise UsageError(f"{save_dir} already holds a run (last.pt); pass --resume to continue it "
                         f"or choose another --save directory")
    config = prepare_config(config, data)
    if config.train.keep_last < 0 or config.train.max_steps < 0:
        raise UsageError("--keep-last and --max-steps must not be negative")
    if ckpt is not None:
        saved_model = ckpt["config"].get("model", {}) if isinstance(ckpt["config"], dict) else {}
        for key in ("src_vocab_size", "tgt_vocab_size"):
            if saved_model.get(key) != getattr(config.model, key):
                raise UsageError(f"--resume: {data.path} has {key} {getattr(config.model, key)} but {last} "
                                 f"was trained with {saved_model.get(key)}; resume with the run's own data")
    return data, config, ckpt


def make_optimizer(model: Seq2Seq, config: Config) -> FusedOptimizer | torch.optim.Optimizer:
    """Adam or SGD through torch's fused kernels (one multi-tensor kernel per step instead of ~10
    passes over all parameters; nmtkit.optim: torch.optim's updates without its dynamo import);
    torch.optim's own unfused ones on devices the fused kernels do not serve."""
    adam = config.train.optimizer == "adam"
    if all(p.device.type in ("cpu", "cuda") for p in model.parameters()):
        return (Adam if adam else SGD)(model.parameters(), lr=config.train.lr)
    return (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr=config.train.lr)


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The RNG seed of one micro-batch: a function of where it is in the data, nothing else."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_to_tuple(states["python"]))
    if "numpy" in states:
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state_to_plain(state: tuple) -> tuple:
    """numpy's legacy RNG state with its key array as a tensor (weights_only-loadable)."""
    name, keys, pos, has_gauss, gauss = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def unused_parameters(model: Seq2Seq) -> list[str]:
    """Parameters that get no gradient from a forward pass (e.g. an LSTM bridge's cell projection
    under a GRU); DDP must be told about them. Probed on a tiny batch in eval mode (no RNG used)."""
    device = next(model.parameters()).device
    cfg = model.config
    src_tok = min(4, cfg.src_vocab_size - 1)
    tgt_tok = min(4, cfg.tgt_vocab_size - 1)
    was_training = model.training
    model.eval()
    try:
        src = torch.full((1, 2), src_tok, dtype=torch.long, device=device)
        tgt_in = torch.tensor([[BOS, tgt_tok]], dtype=torch.long, device=device)
        logits, _ = model(src, torch.tensor([2], device=device), tgt_in)
        logits.float().sum().backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return Batch(batch.src.to(device, non_blocking=True), batch.src_lens.to(device),
                 batch.tgt_in.to(device, non_blocking=True), batch.tgt_out.to(device, non_blocking=True),
                 batch.indices)


class StopSignals:
    """SIGINT/SIGTERM set a flag that the loop reads at update boundaries. The same signal again
    within a second is ignored (torchrun and a terminal both deliver Ctrl-C); later, it aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.when = 0.0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.when = signum, time.monotonic()
        elif time.monotonic() - self.when > 1.0:
            raise KeyboardInterrupt


class Trainer:
    """Owns model, optimizer, data and run directory for one training run (one process of it)."""

    def __init__(self, data_dir: str | Path, save_dir: str | Path, config: Config,
                 resume: bool = False, log: Callable[[str], None] | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None, dist_info: DistInfo | None = None) -> None:
        self.dist = dist_info or DistInfo(device=default_device())
        self.log = (log or _stderr) if self.dist.is_main else (lambda msg: None)
        self.data, self.config, ckpt = check_run(data_dir, save_dir, config, resume, overrides)
        self.save_dir = Path(save_dir)
        if self.dist.is_main:
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise NmtkitError(f"cannot create --save directory {self.save_dir}: {e.strerror or e}") from None
        self.state = TrainState()
        torch.manual_seed(self.config.train.seed)
        random.seed(self.config.train.seed)
        self.model = build_model(self.config.model).to(self.dist.device)
        self.optimizer = make_optimizer(self.model, self.config)
        self.state.lr = self.config.train.lr
        last = self.save_dir / "last.pt"
        if ckpt is not None:
            try:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
                saved_state = {f.name: ckpt["train_state"][f.name] for f in fields(TrainState)
                               if f.name in ckpt["train_state"]}
                self.state = TrainState(**saved_state)
                if "best_saved_ppl" not in ckpt["train_state"]:
                    self.state.best_saved_ppl = self.state.best_ppl
                if "rng" in ckpt:
                    set_rng_states(ckpt["rng"])
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise NmtkitError(f"{last}: cannot resume from it ({str(e).strip().splitlines()[0][:200]})") from None
            self.log(f"resumed from {last} at epoch {self.state.epoch + 1}, batch {self.state.batch}, "
                     f"step {self.state.step}")
        self.net: torch.nn.Module = self.model  # what the forward pass runs through (DDP wrapper)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids,
                                               find_unused_parameters=bool(unused_parameters(self.model)))
        self.train_data = self.data.split("train")
        self.valid_data = self.data.split("valid")
        if len(self.train_data) == 0:
            raise NmtkitError(f"{self.data.path}: the training split holds no sentence pairs")
        self.tokenizers = {side: Tokenizer(self.data.tokenizer_bytes(lang))
                           for side, lang in (("src", self.data.src), ("tgt", self.data.tgt))}
        self.metrics_path = self.save_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ steps

    def group_size(self) -> int:
        """Batches per optimizer update, over all processes."""
        return self.dist.world_size * self.config.train.update_freq

    def update(self, batches: list[np.ndarray], first: int) -> tuple[float, int]:
        """One optimizer update over ``batches`` (this update's share of the epoch, all ranks;
        ``first`` is the position of batches[0] in the epoch). Returns this rank's (NLL, tokens)."""
        cfg = self.config.train
        tgt_lens = self.train_data.tgt_lens
        total = sum(int(tgt_lens[idx].sum()) + len(idx) for idx in batches)  # target tokens + EOS
        k, r = cfg.update_freq, self.dist.rank
        mine = list(range(r * k, min((r + 1) * k, len(batches))))
        weight = self.dist.world_size / total  # DDP averages over ranks; this makes it a sum / total
        if not mine:  # the epoch's last, short group: this rank joins the all-reduce with nothing
            mine, weight = [0], 0.0
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum, tokens = 0.0, 0
        for n, j in enumerate(mine):
            batch = _to_device(collate(self.train_data, batches[j]), self.dist.device)
            torch.manual_seed(batch_seed(cfg.seed, self.state.epoch, first + j))
            last = n == len(mine) - 1
            no_sync = self.net.no_sync() if self.dist.distributed and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(cfg.precision, self.dist.device):
                    loss, nll = self.net(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out,
                                         cfg.label_smoothing)
                (loss * weight).backward()
            if weight:
                nll_sum, tokens = nll_sum + float(nll), tokens + batch.target_tokens
        if cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        self.optimizer.step()
        return nll_sum, tokens

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation perplexity (and greedy BLEU against the raw references); no RNG is used."""
        self.model.eval()
        total, tokens = 0.0, 0
        data: ParallelData = self.valid_data
        for idx in token_batches(data.src_lens, data.tgt_lens, self.config.train.batch_tokens, shuffle=False,
                                 max_sents=self.config.train.batch_sents):
            batch = _to_device(collate(data, idx), self.dist.device)
            with autocast(self.config.train.precision, self.dist.device):
                total += float(self.model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out)[1])
            tokens += batch.target_tokens
        result = {"valid_ppl": math.exp(min(total / max(tokens, 1), 100.0))}
        if self.config.train.valid_bleu:
            sources = [data.source(i).tolist() for i in range(len(data))]
            opts = DecodeOptions(beam=1, batch_size=64, precision=self.config.train.precision)
            hyps = [self.tokenizers["tgt"].decode(o) for o in translate_ids(self.model, sources, opts)]
            result["valid_bleu"] = bleu(hyps, self.data.references("valid"))
        return result

    def shared_validation(self) -> dict[str, float]:
        """Rank 0 validates; every rank gets the result (they all keep the same schedule state)."""
        metrics = self.validate() if self.dist.is_main else {}
        if self.dist.distributed:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    # ------------------------------------------------------------------ checkpoints and logs

    def checkpoint_payload(self, with_optimizer: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "config": self.config.to_dict(),
            "tokenizers": {side: tok.model_proto for side, tok in self.tokenizers.items()},
            "vocab": {side: join_vocab(tok.pieces()) for side, tok in self.tokenizers.items()},
            "data": {"src": self.data.src, "tgt": self.data.tgt, "dir": str(self.data.path)},
            "model": self.model.state_dict(),
            "train_state": {**self.state.__dict__},
        }
        if with_optimizer:
            payload["optimizer"] = self.optimizer.state_dict()
            payload["rng"] = rng_states()
        return payload

    def write_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise NmtkitError(f"cannot write {self.metrics_path}: {e.strerror or e}") from None

    def end_of_validation(self, metrics: dict[str, float], scheduled: bool = True) -> bool:
        """Log, decay lr, save best; returns True when early stopping says stop.

        An unscheduled (final) validation, when ``max_steps`` stops a run between scheduled ones,
        is logged and may update best.pt but leaves the schedule (lr, patience) untouched, so a
        run stopped there and resumed continues exactly like one never stopped.
        """
        cfg = self.config.train
        epoch_end = self.state.batch == 0 and self.state.epoch > 0
        # the epoch being trained, or at an epoch's end the one just finished (1-based)
        epoch = self.state.epoch if epoch_end else self.state.epoch + 1
        record = {"epoch": epoch, "step": self.state.step, "lr": self.state.lr, **metrics}
        improved = metrics["valid_ppl"] < self.state.best_ppl
        if scheduled:
            if improved:
                self.state.best_ppl = metrics["valid_ppl"]
                self.state.bad_validations = 0
            else:
                self.state.bad_validations += 1
            on_schedule = bool(cfg.lr_decay_start) and epoch_end and epoch >= cfg.lr_decay_start
            if on_schedule or not improved:  # decay once, whichever the reason
                self.state.lr *= cfg.lr_decay
                for group in self.optimizer.param_groups:
                    group["lr"] = self.state.lr
        else:
            record["final"] = True
        self.state.history.append(record)
        self.write_metrics({"event": "valid", **record})
        save_best = metrics["valid_ppl"] < self.state.best_saved_ppl
        bleu_text = f", BLEU {metrics['valid_bleu']:.2f}" if "valid_bleu" in metrics else ""
        self.log(f"epoch {record['epoch']} step {record['step']}: valid ppl {metrics['valid_ppl']:.2f}"
                 f"{bleu_text}{' (best)' if save_best else ''}")
        if save_best:
            self.state.best_saved_ppl = metrics["valid_ppl"]
            if self.dist.is_main:
                save_checkpoint(self.save_dir / "best.pt", self.checkpoint_payload(with_optimizer=False))
        return bool(scheduled and cfg.patience and self.state.bad_validations >= cfg.patience)

    def save_last(self) -> None:
        """last.pt (and, with keep_last, step-N.pt; older step checkpoints beyond N are removed)."""
        if not self.dist.is_main:
            return
        last = self.save_dir / "last.pt"
        save_checkpoint(last, self.checkpoint_payload(with_optimizer=True))
        keep = self.config.train.keep_last
        if keep > 0:
            step_file = self.save_dir / f"step-{self.state.step}.pt"
            tmp = self.save_dir / f".{step_file.name}.tmp{os.getpid()}"
            try:
                tmp.unlink(missing_ok=True)
                try:
                    os.link(last, tmp)  # no second copy on disk: the step file shares last.pt's data
                except OSError:
                    shutil.copyfile(last, tmp)
                os.replace(tmp, step_file)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise NmtkitError(f"cannot write checkpoint {step_file}: {e.strerror or e}") from None
            steps = sorted((int(m.group(1)), p) for p in self.save_dir.iterdir()
                           if (m := STEP_CHECKPOINT.fullmatch(p.name)))
            for _, old in steps[:-keep]:
                old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ loop

    def all_ranks_any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.dist.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.dist.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_ranks_sum(self, *values: float) -> list[float]:
        if not self.dist.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t)
        return t.tolist()

    def check_replicas(self) -> None:
        """Every process must hold the same weights (DDP's promise); compared by SHA-256."""
        digests = [hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
                   for p in self.model.parameters()]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, digests)
        differ = [rank for rank, d in enumerate(gathered) if d != gathered[0]]
        if differ:
            raise NmtkitError(f"training processes {differ} hold weights different from process 0's; "
                              f"the run is not trustworthy (last.pt is rank 0's)")

    def run(self) -> dict[str, Any]:
        with StopSignals() as signals:
            return self._run(signals)

    def _run(self, signals: StopSignals) -> dict[str, Any]:
        cfg = self.config.train
        n_params = sum(p.numel() for p in self.model.parameters())
        procs = (f"; {self.dist.world_size} processes ({dist.get_backend()})" if self.dist.distributed else "")
        self.log(f"model: {self.config.model.encoder} encoder, {self.config.model.decoder} decoder, "
                 f"{self.config.model.attention} attention ({self.config.model.window}); "
                 f"{n_params / 1e6:.2f}M parameters; {len(self.train_data)} training pairs{procs}; "
                 f"{self.group_size()} batches per update")
        if self.dist.is_main:
            try:
                (self.save_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            except OSError as e:
                raise NmtkitError(f"cannot write {self.save_dir / 'config.json'}: {e.strerror or e}") from None
        start_time = time.time()
        stopped = ""  # why the loop ended early: max_steps, patience, signal
        saved = False  # last.pt holds the current state
        just_validated = False
        epoch_batches: tuple[int, list[np.ndarray]] | None = None
        bar = None
        window_nll, window_tokens, window_start = 0.0, 0, time.time()
        if cfg.max_steps and self.state.step >= cfg.max_steps:
            stopped = "max_steps"
            just_validated = True  # nothing was trained: no final validation
        while not stopped and self.state.epoch < cfg.epochs:
            if epoch_batches is None or epoch_batches[0] != self.state.epoch:
                batches = token_batches(self.train_data.src_lens, self.train_data.tgt_lens, cfg.batch_tokens,
                                        seed=cfg.seed, epoch=self.state.epoch, max_sents=cfg.batch_sents)
                epoch_batches = (self.state.epoch, batches)
                if bar is not None:
                    bar.close()
                bar = tqdm(total=len(batches), initial=self.state.batch, desc=f"epoch {self.state.epoch + 1}",
                           disable=not (self.dist.is_main and sys.stderr.isatty()), leave=False, unit="batch")
            batches = epoch_batches[1]
            first = self.state.batch
            group = batches[first:first + self.group_size()]
            nll, tokens = self.update(group, first)
            self.state.batch += len(group)
            self.state.step += 1
            saved = just_validated = False
            window_nll, window_tokens = window_nll + nll, window_tokens + tokens
            bar.update(len(group))
            if self.state.step % cfg.log_every == 0:
                window_nll, window_tokens = self.all_ranks_sum(window_nll, window_tokens)
                elapsed = time.time() - window_start
                record = {"event": "train", "epoch": self.state.epoch + 1, "step": self.state.step,
                          "train_ppl": math.exp(min(window_nll / max(window_tokens, 1), 100.0)),
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9), "lr": self.state.lr,
                          "tokens": window_tokens, "seconds": elapsed}
                self.write_metrics(record)
                bar.set_postfix(ppl=f"{record['train_ppl']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if not sys.stderr.isatty():
                    self.log(f"epoch {record['epoch']} step {record['step']}: train ppl "
                             f"{record['train_ppl']:.2f}, {record['tokens_per_s']:.0f} tokens/s")
                window_nll, window_tokens, window_start = 0.0, 0, time.time()
            scheduled = bool(cfg.valid_every and self.state.step % cfg.valid_every == 0)
            if self.state.batch >= len(batches):  # end of epoch: always a validation
                self.state.epoch += 1
                self.state.batch = 0
                scheduled = True
            if scheduled:
                if self.end_of_validation(self.shared_validation()):
                    stopped = "patience"
                self.save_last()
                saved = just_validated = True
            if not stopped and cfg.max_steps and self.state.step >= cfg.max_steps:
                stopped = "max_steps"
            if self.all_ranks_any(signals.signum is not None) and not stopped:
                stopped = "signal"
        if bar is not None:
            bar.close()
        if stopped == "max_steps" and not just_validated:
            self.end_of_validation(self.shared_validation(), scheduled=False)
        if not saved:
            self.save_last()
        replicas = ""
        if self.dist.distributed:
            self.check_replicas()
            replicas = f" (weights identical on all {self.dist.world_size} processes)"
            dist.barrier()  # no process leaves before last.pt is written
        elapsed = time.time() - start_time
        summary: dict[str, Any] = {"event": "done", "steps": self.state.step, "epochs": self.state.epoch,
                                   "best_valid_ppl": self.state.best_saved_ppl, "seconds": elapsed}
        if stopped == "signal":
            signum = signals.signum or signal.SIGTERM
            summary.update(event="interrupted", signal=signal.Signals(signum).name, exit_code=128 + signum)
            self.write_metrics(summary)
            self.log(f"interrupted by {signal.Signals(signum).name} at epoch {self.state.epoch + 1}, "
                     f"step {self.state.step}: saved {self.save_dir / 'last.pt'}; continue with --resume")
            return summary
        self.write_metrics(summary)
        self.log(f"done: {self.state.step} steps in {elapsed:.0f} s{replicas}; best valid ppl "
                 f"{self.state.best_saved_ppl:.2f}; checkpoints in {self.save_dir}")
        return summary


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_worker(info: DistInfo, data_dir, save_dir, config_dict, resume, overrides) -> dict[str, Any]:
    config = Config.from_dict(config_dict)
    return Trainer(data_dir, save_dir, config, resume, overrides=overrides, dist_info=info).run()


def train(data_dir: str | Path, save_dir: str | Path, config: Config, resume: bool = False,
          log: Callable[[str], None] | None = None, nproc: int = 1,
          overrides: dict[str, dict[str, Any]] | None = None,
          device: str = "auto") -> dict[str, Any]:
    """Train a model on a preprocessed data directory; checkpoints go to ``save_dir``.

    ``nproc`` > 1 starts that many local processes (DDP); under torchrun the process group comes
    from the environment. ``device``: auto (a GPU where CUDA sees one), cpu or cuda; it is not part
    of the run's config, so a run may be resumed on another device. With ``resume``, the config is
    the checkpoint's, with ``overrides`` ({section: {key: value}}, the values given explicitly)
    applied where that is allowed.
    """
    try:
        if nproc != 1:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UsageError("--nproc starts its own processes; do not combine it with torchrun")
            if nproc < 1:
                raise UsageError(f"--nproc must be at least 1 (got {nproc})")
            _, resolved, _ = check_run(data_dir, save_dir, config, resume, overrides)  # fail fast, once
            return launch(nproc, _train_worker, str(data_dir), str(save_dir), resolved.to_dict(), resume,
                          overrides, device=device)
        info = init_distributed(device=device)
        try:
            return Trainer(data_dir, save_dir, config, resume, log, overrides, info).run()
        finally:
            if info.distributed and dist.is_initialized():
                dist.destroy_process_group()
    except MemoryError:
        raise NmtkitError("out of memory: lower --batch-tokens or the model size") from None
