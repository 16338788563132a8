"""Training end to end on the synthetic reverse task; checkpoints round-trip exactly."""

import json

import torch

from conftest import reverse_pairs, small_config
from nmtkit.checkpoint import FORMAT_VERSION, LoadedModel
from nmtkit.translate import DecodeOptions, translate_lines


def exact_match(loaded, pairs, beam):
    hyps = list(translate_lines(loaded, [s for s, _ in pairs], DecodeOptions(beam=beam)))
    return sum(h == t for h, (_, t) in zip(hyps, pairs)) / len(pairs)


def test_reverse_task_is_learned(trained_reverse):
    loaded = LoadedModel(trained_reverse / "best.pt")
    pairs = reverse_pairs(200, seed=3)  # the held-out test split
    assert exact_match(loaded, pairs, beam=1) >= 0.95
    assert exact_match(loaded, pairs, beam=5) >= 0.95


def test_run_directory_contents(trained_reverse):
    records = [json.loads(line) for line in (trained_reverse / "metrics.jsonl").read_text().splitlines()]
    valids = [r for r in records if r["event"] == "valid"]
    assert len(valids) == small_config().train.epochs  # one per epoch
    assert valids[-1]["valid_ppl"] < valids[0]["valid_ppl"]
    assert records[-1]["event"] == "done"
    assert (trained_reverse / "last.pt").is_file() and (trained_reverse / "best.pt").is_file()


def test_checkpoint_is_plain_data_and_round_trips(trained_reverse):
    raw = torch.load(trained_reverse / "last.pt", weights_only=True)  # no code can run
    assert raw["format_version"] == FORMAT_VERSION
    assert set(raw["tokenizers"]) == {"src", "tgt"} and isinstance(raw["tokenizers"]["src"], bytes)
    assert raw["vocab"]["tgt"].split("\n")[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert "optimizer" in raw and "train_state" in raw
    best = torch.load(trained_reverse / "best.pt", weights_only=True)
    assert "optimizer" not in best  # translation checkpoints stay small

    loaded = LoadedModel(trained_reverse / "last.pt")
    again = LoadedModel(trained_reverse / "last.pt")
    src = torch.tensor([[4, 5, 6, 7], [8, 9, 4, 0]])
    lengths = torch.tensor([4, 3])
    tgt_in = torch.tensor([[2, 5, 6, 7], [2, 9, 8, 0]])
    with torch.no_grad():
        a, _ = loaded.model(src, lengths, tgt_in)
        b, _ = again.model(src, lengths, tgt_in)
    assert torch.equal(a, b)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, raw["model"][name])


def test_lr_decay_start_halves_every_epoch_from_then_on(reverse_data, tmp_path):
    """Luong §4.1's schedule: from the end of epoch `lr_decay_start` on, the lr is multiplied by
    lr_decay at every epoch's end (once, also when perplexity did not improve); before, only on a plateau."""
    from nmtkit.train import train

    config = small_config()
    config.train.epochs, config.train.lr_decay, config.train.lr_decay_start, config.train.max_steps = 4, 0.5, 2, 0
    train(reverse_data, tmp_path / "run", config, log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["event"] == "valid"]  # the lr the epoch was trained with
    assert lrs == [0.01, 0.01, 0.005, 0.0025]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == 0.00125  # decayed after the last epoch too
