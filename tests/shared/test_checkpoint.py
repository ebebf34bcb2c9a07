"""shared.checkpoint: round trip, atomic layout, and corruption detected."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.checkpoint import (
    FORMAT,
    MAX_NESTING,
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


# -- the metadata is bound by the hash, and malformed metadata is one line --------------------

SPEC = {"name": "mlp", "in_channels": 1, "num_classes": 10, "input_size": 8, "time_steps": 2,
        "neuron": "lif", "surrogate": "atan", "weight_bits": 4}


def test_the_metadata_lives_in_the_hashed_file_and_an_edited_sidecar_is_refused(tmp_path, tensors):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "round-001.safetensors", tensors,
                           {"round": 1, "model": SPEC})
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["spikefed"])["model"] == SPEC
    meta = json.loads(metadata_path(path).read_text())
    meta["model"] = {**SPEC, "hidden": 16384}  # what the 63 GB checkpoint did
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="differs from the metadata the sha256 covers"):
        load_checkpoint(path)


def test_a_spec_beyond_the_bounds_is_refused_even_with_a_matching_hash(tmp_path):
    """A sender controls both files: the hash proves integrity, not intent; the bounds hold."""
    path = save_checkpoint(tmp_path / "round-001.safetensors", {"w": torch.zeros(1)},
                           {"round": 1, "model": {**SPEC, "hidden": 20_000_000}})
    with pytest.raises(CheckpointError, match="hidden=20000000 is outside"):
        load_checkpoint(path)


def test_a_format_1_checkpoint_is_refused_with_a_hint(tmp_path, tensors):
    path = save_checkpoint(tmp_path / "round-001.safetensors", tensors, {"round": 1})
    meta = json.loads(metadata_path(path).read_text())
    metadata_path(path).write_text(json.dumps({**meta, "format": "spikefed-checkpoint/1"}))
    with pytest.raises(CheckpointError, match="older spikefed"):
        load_checkpoint(path)


JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIXTURES = [HealthCheck.function_scoped_fixture]  # tmp_path is reused: each example rewrites
FIELDS = st.sampled_from(["sha256", "bytes", "round", "format", "model"])


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURES)
@given(field=FIELDS, value=JSON)
def test_any_malformed_sidecar_field_is_one_line_or_a_valid_load(tmp_path, tensors, field, value):
    path = save_checkpoint(tmp_path / "round-001.safetensors", tensors, {"round": 1})
    meta = json.loads(metadata_path(path).read_text())
    meta[field] = value
    metadata_path(path).write_text(json.dumps(meta))
    try:
        loaded, _ = load_checkpoint(path)
    except CheckpointError as err:
        assert "\n" not in str(err) and len(str(err)) < 600
    else:  # only the unchanged value may load
        assert loaded.keys() == tensors.keys()


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(spec=st.dictionaries(st.sampled_from([*SPEC, "hidden", "decay", "train_mode", "junk"]),
                            JSON, max_size=9))
def test_any_model_spec_in_a_hashed_checkpoint_is_one_line_or_bounded(tmp_path, spec):
    from shared.rebuild import MAX_PARAMETERS, build_from_spec

    path = save_checkpoint(tmp_path / "round-001.safetensors", {"w": torch.zeros(1)},
                           {"round": 1, "model": {**SPEC, **spec}})
    try:
        _, meta = load_checkpoint(path)
    except CheckpointError as err:
        assert "\n" not in str(err)
    else:
        with torch.device("meta"):
            model = build_from_spec(meta["model"])
        assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # crashed the old parser (RecursionError)
    json.dumps({"format": FORMAT, "sha256": 7, "bytes": 1}),
    json.dumps({"format": FORMAT, "sha256": "a" * 64, "bytes": 1, "round": -1}),
    json.dumps({"format": FORMAT, "sha256": "a" * 64, "bytes": 1, "round": True}),
    json.dumps({"format": FORMAT, "sha256": "a" * 64, "bytes": 2**40}),
    json.dumps({"format": FORMAT, "sha256": "a" * 64, "x": [[[[[]]]]] }).replace(
        "[[[[[]]]]]", "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)),
    "\x00{not json",
])
def test_hostile_sidecars_are_one_line(tmp_path, tensors, text):
    path = save_checkpoint(tmp_path / "round-001.safetensors", tensors, {"round": 1})
    metadata_path(path).write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_resume_skips_a_checkpoint_with_malformed_metadata(tmp_path, tensors, caplog):
    from shared.rundir import RunDir

    run = RunDir(tmp_path)
    for r in (1, 2):
        save_checkpoint(run.checkpoint(r), tensors, {"round": r})
    metadata_path(run.checkpoint(2)).write_text("[" * 100_000)
    with caplog.at_level("WARNING"):
        assert run.check_start(resume=True) == 1
    assert "round-002.json" in caplog.text and "nests deeper" in caplog.text
