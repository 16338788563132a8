"""Checkpoints: atomic writes (a crash or a full disk never costs the previous checkpoint) and
loading that refuses anything that is not a plain-data nmtkit checkpoint with one clear error."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmtkit.checkpoint import FORMAT_VERSION, LoadedModel, load_checkpoint, save_checkpoint
from nmtkit.errors import NmtkitError

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"nmtkit-pickle-ran-{os.getpid()}"


def _touch(path: str) -> None:  # what a malicious pickle would run
    Path(path).write_text("code ran")


class Evil:
    def __reduce__(self):
        return (_touch, (str(MARKER),))


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp" in p.name]


def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": {}, "tokenizers": {}, "model": {"w": torch.ones(3)}})
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # part of the new file is on disk ...
        raise RuntimeError("simulated crash")  # ... when the process dies

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(path, {"config": {}, "tokenizers": {}, "model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert leftovers(tmp_path) == []


def test_disk_full_is_one_clear_error_and_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"config": {}, "tokenizers": {}, "model": {"w": torch.ones(3)}})

    def full(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(NmtkitError) as info:
        save_checkpoint(path, {"config": {}, "tokenizers": {}, "model": {"w": torch.zeros(3)}})
    message = str(info.value)
    assert message == f"cannot write checkpoint {path}: No space left on device (the previous checkpoint is intact)"
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert leftovers(tmp_path) == []


def test_pickled_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "tokenizers": {}, "model": {}, "x": Evil()}, path)
    MARKER.unlink(missing_ok=True)
    with pytest.raises(NmtkitError, match=r"refused: holds a pickled Python object \(test_checkpoint._touch\).*weights_only=True"):
        load_checkpoint(path)
    assert not MARKER.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable nmtkit checkpoint"),
    (b"\x80\x04garbage" * 10, "not a readable nmtkit checkpoint"),
])
def test_corrupt_bytes(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(NmtkitError, match=message):
        load_checkpoint(path)


def test_not_a_checkpoint_and_newer_format(tmp_path):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(NmtkitError, match="not an nmtkit checkpoint"):
        load_checkpoint(tensor)
    newer = tmp_path / "newer.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "config": {}, "tokenizers": {}, "model": {}}, newer)
    with pytest.raises(NmtkitError, match=f"checkpoint format {FORMAT_VERSION + 1} is newer"):
        load_checkpoint(newer)
    with pytest.raises(NmtkitError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_truncated_real_checkpoint(untrained_checkpoint, tmp_path):
    data = untrained_checkpoint.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(NmtkitError, match=str(path)):
            LoadedModel(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_checkpoints_fail_cleanly(untrained_checkpoint, tmp_path, data):
    """Random truncations, byte flips and random bytes: loading succeeds or raises NmtkitError."""
    original = untrained_checkpoint.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        blob = original[:data.draw(st.integers(0, len(original) - 1))]
    elif kind == "flip":
        blob = bytearray(original)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(max_size=4096))
    path = tmp_path / "damaged.pt"
    path.write_bytes(blob)
    try:
        LoadedModel(path)
    except NmtkitError as e:
        assert "\n" not in str(e) and str(path) in str(e)


def test_format_1_checkpoint_is_migrated(tmp_path):
    """Format 1 stored each vocabulary as a list of pieces; it loads as format 2's joined string."""
    old = tmp_path / "v1.pt"
    torch.save({"format_version": 1, "config": {}, "tokenizers": {}, "model": {},
                "vocab": {"src": ["<pad>", "<unk>", "▁ein"], "tgt": ["<pad>", "<unk>"]}}, old)
    ckpt = load_checkpoint(old)
    assert ckpt["format_version"] == FORMAT_VERSION == 2
    assert ckpt["vocab"] == {"src": "<pad>\n<unk>\n▁ein", "tgt": "<pad>\n<unk>"}
