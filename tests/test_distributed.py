"""Distributed training on CPU with gloo: two processes stay identical to each other and equal
one process with --update-freq 2 (same batches per update, loss normalised by all their tokens,
dropout seeded by batch position), through the library, `nmtkit train --nproc 2` and torchrun.
Everything here runs on the CPU (--device cpu), also where there is a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, small_config
from nmtkit.checkpoint import load_checkpoint
from nmtkit.config import Config
from nmtkit.distributed import DistInfo, launch
from nmtkit.train import Trainer, train

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 6  # 9 batches an epoch, 2 per update: crosses the epoch end, whose last group has 1 batch
FLAGS = ["--device", "cpu", "--layers", "1", "--hidden-size", "32", "--embed-size", "16", "--dropout", "0.3",
         "--batch-tokens", "1500", "--lr", "0.01", "--max-steps", str(STEPS), "--no-valid-bleu"]


def dist_config(**train) -> Config:
    config = small_config(hidden_size=32, embed_size=16, dropout=0.3)
    config.train.batch_tokens, config.train.max_steps, config.train.lr = 1500, STEPS, 0.01
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def _rank_worker(info: DistInfo, data_dir: str, save_dir: str, out_dir: str, config_dict: dict) -> int:
    """Each rank trains, then writes its own weights (only rank 0 writes checkpoints)."""
    trainer = Trainer(data_dir, save_dir, Config.from_dict(config_dict), log=lambda m: None, dist_info=info)
    trainer.run()
    torch.save(trainer.model.state_dict(), os.path.join(out_dir, f"rank{info.rank}.pt"))
    return info.rank


@pytest.fixture(scope="module")
def reference(reverse_data, tmp_path_factory):
    """One process, update_freq 2: the weights every 2-process run must reproduce."""
    save = tmp_path_factory.mktemp("single") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train(reverse_data, save, dist_config(update_freq=2), log=lambda m: None, device="cpu")
    torch.set_num_threads(before)
    return load_checkpoint(save / "last.pt")


def assert_close(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_gloo_processes_equal_each_other_and_update_freq_2(reverse_data, reference, tmp_path):
    config = dist_config().to_dict()
    assert launch(2, _rank_worker, str(reverse_data), str(tmp_path / "run"), str(tmp_path), config,
                  device="cpu") == 0
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_close(rank0, rank1, exact=True)
    assert_close(rank0, reference["model"])
    saved = load_checkpoint(tmp_path / "run" / "last.pt")  # written by rank 0 alone
    assert saved["train_state"]["step"] == STEPS
    assert saved["train_state"]["epoch"] == reference["train_state"]["epoch"] == 1
    assert_close(saved["model"], rank0, exact=True)


def test_cli_nproc_2(reverse_data, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    save = tmp_path / "run"
    result = run_cli("train", str(reverse_data), "--save", str(save), *FLAGS, "--nproc", "2")
    assert result.stdout == ""
    assert "2 processes (gloo); 2 batches per update" in result.stderr
    assert result.stderr.count("model: ") == 1  # only rank 0 logs
    assert "weights identical on all 2 processes" in result.stderr  # SHA-256 of every parameter
    assert_close(load_checkpoint(save / "last.pt")["model"], reference["model"])


def test_torchrun_standalone(reverse_data, reference, tmp_path):
    save = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "nmtkit", "train", str(reverse_data),
                             "--save", str(save), *FLAGS],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert_close(load_checkpoint(save / "last.pt")["model"], reference["model"])


def test_nproc_misuse_is_a_usage_error(reverse_data, tmp_path, monkeypatch):
    from nmtkit.errors import UsageError

    with pytest.raises(UsageError, match="--nproc must be at least 1"):
        train(reverse_data, tmp_path / "run", dist_config(), nproc=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="do not combine it with torchrun"):
        train(reverse_data, tmp_path / "run", dist_config(), nproc=2)


def test_device_choice(reverse_data, tmp_path):
    from nmtkit.distributed import default_device
    from nmtkit.errors import UsageError

    assert default_device(0, "cpu").type == "cpu"
    assert default_device(0, "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'; choose one of: auto, cpu, cuda"):
        train(reverse_data, tmp_path / "run", dist_config(), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: torch sees no CUDA GPU"):
            train(reverse_data, tmp_path / "run", dist_config(), device="cuda")
        result = run_cli("train", str(reverse_data), "--save", str(tmp_path / "cli"), *FLAGS[2:], "--device",
                         "cuda", check=False)
        assert result.returncode == 2 and result.stderr.strip().endswith("torch sees no CUDA GPU on this machine")
    assert not (tmp_path / "run").exists()  # refused before anything was written
