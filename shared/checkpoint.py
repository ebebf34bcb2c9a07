"""Checkpoints: safetensors weights plus a JSON sidecar holding metadata and the file's sha256.

    round-007.safetensors   the tensors (no pickle: safe to load from anyone)
    round-007.json          {"format", "sha256", "bytes", "round", "model": {...}, ...}

Both files are written to a temporary file in the same directory, fsynced and renamed, weights
first, so the JSON's presence marks a complete checkpoint. Loading recomputes the sha256 and refuses
a file that does not match (truncated, tampered, or half-written).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import CheckpointError

FORMAT = "spikefed-checkpoint/1"


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def metadata_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> Path:
    """Write `tensors` to `path` (.safetensors) and `metadata` + sha256 to the `.json` beside it."""
    path = Path(path)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write(path, data)
    sidecar = {  # the file's own facts win over stale ones in `metadata` (e.g. copied meta)
        **metadata,
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    atomic_write(metadata_path(path), (json.dumps(sidecar, indent=2) + "\n").encode())
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of checkpoint `path`, checked for format (not the weights' hash)."""
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint metadata {meta_file} is missing; pass a .safetensors "
                              "file written by spikefed (its .json must lie beside it)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_file} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise CheckpointError(f"{meta_file} is not a {FORMAT} metadata file")
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (tensors, metadata) after verifying the weights' sha256 against the metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    meta = read_metadata(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: sha256 {digest[:12]}... does not match the recorded "
            f"{meta['sha256'][:12]}... (truncated or modified file); use an earlier round"
        )
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {err}") from None
    return tensors, meta

