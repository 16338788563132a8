"""Exact resume: a run stopped (max_steps, SIGINT) and resumed ends with the same weights as one
that never stopped; --keep-last bounds the step checkpoints kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli, small_config
from nmtkit.checkpoint import load_checkpoint
from nmtkit.errors import UsageError
from nmtkit.train import Trainer, train

QUIET = lambda message: None  # noqa: E731
pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_gpu")


@pytest.fixture
def deterministic_gpu(monkeypatch):
    """Where ``train`` picks a GPU: CUDA's deterministic kernels. With its default ones (atomic
    adds) two identical GPU runs already differ by ~1e-5 after 12 updates (H100, measured); with
    deterministic kernels straight, repeated and resumed runs were bitwise equal. On the CPU: a no-op."""
    if not torch.cuda.is_available():
        yield
        return
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def resume_config(**train):
    """Tiny, with dropout (so the RNG matters) and greedy BLEU at validation; ~9 batches an epoch."""
    config = small_config(hidden_size=32, embed_size=16, dropout=0.3)
    config.train.batch_tokens, config.train.lr, config.train.valid_every = 1200, 0.01, 5
    config.train.valid_bleu, config.train.lr_decay = True, 0.5
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def assert_same_training(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    for key in ("epoch", "batch", "step", "lr", "best_ppl", "bad_validations"):
        assert a["train_state"][key] == b["train_state"][key], key


def test_stopped_and_resumed_run_equals_uninterrupted(reverse_data, tmp_path):
    # 12 updates cross the end of epoch 1 (after 9); the stop at 7 is not a validation point, so
    # the stopped run validates there (final, unscheduled) without touching the lr schedule.
    train(reverse_data, tmp_path / "straight", resume_config(max_steps=12), log=QUIET)
    train(reverse_data, tmp_path / "stopped", resume_config(max_steps=7), log=QUIET)
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    state = stopped["train_state"]
    assert state["step"] == 7 and state["batch"] == 7
    scheduled, final = state["history"]  # validations at step 5 (valid_every) and 7 (the stop)
    assert final["final"] and "final" not in scheduled
    assert state["best_ppl"] == scheduled["valid_ppl"]  # the stop's validation left the schedule alone
    assert state["best_saved_ppl"] == min(scheduled["valid_ppl"], final["valid_ppl"])  # but best.pt is the best

    trainer = Trainer(reverse_data, tmp_path / "stopped", resume_config(), resume=True, log=QUIET,
                      overrides={"train": {"max_steps": 12}})
    assert torch.equal(torch.get_rng_state(), stopped["rng"]["torch"])  # RNG states restored
    assert trainer.state.step == 7 and trainer.config.train.max_steps == 12
    trainer.run()
    assert_same_training(load_checkpoint(tmp_path / "straight" / "last.pt"),
                         load_checkpoint(tmp_path / "stopped" / "last.pt"))


def test_resume_with_update_freq_and_keep_last(reverse_data, tmp_path):
    config = resume_config(max_steps=6, update_freq=2, valid_every=2, keep_last=2, valid_bleu=False)
    train(reverse_data, tmp_path / "straight", config, log=QUIET)
    train(reverse_data, tmp_path / "stopped", resume_config(max_steps=3, update_freq=2, valid_every=2,
                                                            keep_last=2, valid_bleu=False), log=QUIET)
    train(reverse_data, tmp_path / "stopped", resume_config(), resume=True, log=QUIET,
          overrides={"train": {"max_steps": 6}})
    assert_same_training(load_checkpoint(tmp_path / "straight" / "last.pt"),
                         load_checkpoint(tmp_path / "stopped" / "last.pt"))
    names = sorted(p.name for p in (tmp_path / "straight").iterdir() if p.suffix == ".pt")
    # saves at steps 2, 4, 5 (end of epoch 1: 9 batches, 2 per update) and 6; keep_last=2
    assert names == ["best.pt", "last.pt", "step-5.pt", "step-6.pt"]
    assert load_checkpoint(tmp_path / "straight" / "step-5.pt")["train_state"]["step"] == 5


def test_existing_run_and_changed_model_are_refused(reverse_data, tmp_path):
    train(reverse_data, tmp_path / "run", resume_config(max_steps=1, valid_bleu=False), log=QUIET)
    with pytest.raises(UsageError, match="already holds a run .*--resume"):
        train(reverse_data, tmp_path / "run", resume_config(max_steps=2), log=QUIET)
    with pytest.raises(UsageError, match=r"--resume: --hidden-size \(model.hidden_size\) is 32 in .*got 64"):
        train(reverse_data, tmp_path / "run", resume_config(), resume=True, log=QUIET,
              overrides={"model": {"hidden_size": 64}})
    with pytest.raises(UsageError, match="--resume: no .*last.pt to resume from"):
        train(reverse_data, tmp_path / "other", resume_config(), resume=True, log=QUIET)


def test_sigint_writes_last_and_resume_continues(reverse_data, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save = tmp_path / "run"
    args = ["train", str(reverse_data), "--save", str(save), "--layers", "1", "--hidden-size", "32",
            "--embed-size", "16", "--batch-tokens", "1500", "--epochs", "1000", "--no-valid-bleu",
            "--set", "train.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "nmtkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until training is under way
        lines.append(line)
        if "step 2:" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err
    last = load_checkpoint(save / "last.pt")
    step = last["train_state"]["step"]
    assert step >= 2 and f"interrupted by SIGINT at epoch 1, step {step}: saved {save / 'last.pt'}" in err
    assert [p.name for p in save.iterdir() if ".tmp" in p.name] == []
    resumed = run_cli(*args, "--resume", "--max-steps", str(step + 2))
    assert f"resumed from {save / 'last.pt'} at epoch 1, batch {step}, step {step}" in resumed.stderr
    assert load_checkpoint(save / "last.pt")["train_state"]["step"] == step + 2
