"""shared.checkpoint: round trip, atomic layout, and corruption detected."""

from __future__ import annotations

import json

import pytest
import torch

from shared.checkpoint import (
    CheckpointError,
    load_checkpoint,
    metadata_path,
    read_metadata,
    save_checkpoint,
)
from shared.rundir import find_checkpoints


@pytest.fixture
def tensors():
    gen = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 1, 3, 3, generator=gen), "fc.bias": torch.zeros(10),
            "codes": torch.arange(-8, 8, dtype=torch.int8)}


def test_round_trip(tmp_path, tensors):
    path = save_checkpoint(tmp_path / "ck" / "round-001.safetensors", tensors, {"round": 1})
    loaded, meta = load_checkpoint(path)
    assert meta["round"] == 1 and len(meta["sha256"]) == 64 and meta["bytes"] == path.stat().st_size
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"round-001.safetensors",
                                                             "round-001.json"}
    assert find_checkpoints(tmp_path / "ck") == [path]


@pytest.mark.parametrize("damage", ["truncate", "flip", "missing-json", "missing-file", "bad-json"])
def test_damaged_checkpoint_is_refused(tmp_path, tensors, damage):
    path = save_checkpoint(tmp_path / "round-002.safetensors", tensors, {"round": 2})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "missing-json":
        metadata_path(path).unlink()
    elif damage == "missing-file":
        path.unlink()
    else:
        metadata_path(path).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_tampered_metadata_hash_is_refused(tmp_path, tensors):
    path = save_checkpoint(tmp_path / "round-003.safetensors", tensors, {"round": 3})
    meta = json.loads(metadata_path(path).read_text())
    meta["sha256"] = "0" * 64
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_no_temporary_files_left(tmp_path, tensors):
    for r in range(3):
        save_checkpoint(tmp_path / f"round-{r:03d}.safetensors", tensors, {"round": r})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_hash_in_metadata_does_not_override_the_files_own(tmp_path, tensors):
    first = save_checkpoint(tmp_path / "a.safetensors", tensors, {"round": 1})
    meta = read_metadata(first)
    changed = {name: t + 1 for name, t in tensors.items()}  # int8 codes stay int8
    second = save_checkpoint(tmp_path / "b.safetensors", changed, meta)  # copied metadata
    loaded, meta2 = load_checkpoint(second)
    assert meta2["round"] == 1 and meta2["sha256"] != meta["sha256"]
    assert all(torch.equal(loaded[k], changed[k]) for k in changed)
