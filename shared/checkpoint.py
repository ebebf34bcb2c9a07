"""Checkpoints: safetensors weights with their metadata inside, plus a JSON sidecar with the sha256.

    round-007.safetensors   the tensors, and the metadata in the safetensors header
                            (`__metadata__["spikefed"]`, JSON): no pickle, safe to load from anyone
    round-007.json          {"format", "sha256", "bytes", "round", "model": {...}, ...}

The sha256 covers the whole .safetensors file, header included, so it binds the metadata to the
weights: the sidecar is a readable copy whose every field must equal the header's. Both files are
written to a temporary file in the same directory, fsynced and renamed, weights first, so the
JSON's presence marks a complete checkpoint. Loading checks sizes first (no more than
`MAX_CHECKPOINT_BYTES` read), recomputes the sha256, then parses the metadata with a nesting bound;
anything malformed is a one-line `CheckpointError`. A model spec under `model` is checked by
`shared.rebuild.check_spec` (bounded sizes) before any caller can build from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import CheckpointError

FORMAT = "spikefed-checkpoint/2"  # /1 kept the metadata in the sidecar only (not hashed)
HEADER_KEY = "spikefed"  # the safetensors `__metadata__` entry holding our metadata (JSON)
MAX_CHECKPOINT_BYTES = 2 << 30  # 2 GiB: far above any spikefed model, far below a bomb
MAX_METADATA_BYTES = 16 << 20  # the sidecar and the safetensors header
MAX_NESTING = 32  # JSON depth of metadata (the converted SNN's thresholds are at depth 2)
FILE_FACTS = ("sha256", "bytes")  # what only the sidecar holds (facts about the file)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """Write `tensors` + `metadata` to `path` (.safetensors) and the sidecar (.json) beside it."""
    path = Path(path)
    # the file's own facts win over stale ones in `metadata` (e.g. copied from another file)
    meta = {k: v for k, v in metadata.items() if k not in FILE_FACTS} | {"format": FORMAT}
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={HEADER_KEY: json.dumps(meta)})
    atomic_write(path, data)
    sidecar = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write(metadata_path(path), (json.dumps(sidecar, indent=2) + "\n").encode())
    return path


def _parse_json(text: str | bytes, what: str) -> Any:
    """JSON of bounded size and nesting (a deep document is refused before the parser recurses)."""
    if len(text) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{what} is larger than {MAX_METADATA_BYTES >> 20} MiB")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} is not UTF-8 text") from None
    depth = deepest = 0
    in_string = escaped = False
    for char in text:  # brackets outside strings
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_NESTING:
        raise CheckpointError(f"{what} nests deeper than {MAX_NESTING} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{what} is not valid JSON ({err})") from None


def check_metadata(meta: Any, what: str) -> dict[str, Any]:
    """The fields every reader relies on, typed: a dict of our format, `round` a count."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        hint = (" (written by an older spikefed, whose metadata the hash did not cover; "
                "re-create it)" if found == "spikefed-checkpoint/1" else "")
        raise CheckpointError(f"{what} is not {FORMAT} metadata (format {found!r}){hint}")
    round_ = meta.get("round", 0)
    if type(round_) is not int or round_ < 0:
        raise CheckpointError(f"{what}: 'round' is {round_!r}, not a round number (int >= 0)")
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of checkpoint `path`, checked for format and a well-formed sha256 (not
    yet against the file: `load_checkpoint` does that)."""
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint metadata {meta_file} is missing; pass a .safetensors "
                              "file written by spikefed (its .json must lie beside it)")
    try:
        if meta_file.stat().st_size > MAX_METADATA_BYTES:
            raise CheckpointError(f"checkpoint metadata {meta_file} is larger than "
                                  f"{MAX_METADATA_BYTES >> 20} MiB")
        text = meta_file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint metadata {meta_file} is unreadable: {err}") from None
    meta = check_metadata(_parse_json(text, f"checkpoint metadata {meta_file}"), str(meta_file))
    sha, size = meta.get("sha256"), meta.get("bytes")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise CheckpointError(f"{meta_file}: 'sha256' is {str(sha)[:80]!r}, not 64 hex digits")
    if type(size) is not int or not 0 < size <= MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{meta_file}: 'bytes' is {str(size)[:80]!r}, not a file size in "
                              f"1..{MAX_CHECKPOINT_BYTES}")
    return meta


def _header_metadata(data: bytes, path: Path) -> dict[str, Any]:
    """Our metadata from the safetensors header: u64 little-endian length, then JSON."""
    if len(data) < 8:
        raise CheckpointError(f"checkpoint {path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, MAX_METADATA_BYTES):
        raise CheckpointError(f"checkpoint {path} has a safetensors header of {length} bytes, "
                              "more than the file holds")
    header = _parse_json(data[8 : 8 + length], f"the safetensors header of {path}")
    entry = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get(HEADER_KEY), str):
        raise CheckpointError(f"checkpoint {path} holds no spikefed metadata in its header "
                              "(not written by spikefed's save_checkpoint)")
    return check_metadata(_parse_json(entry[HEADER_KEY], f"the metadata in {path}"), str(path))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (tensors, metadata) after verifying the file as a whole: its size and sha256 against
    the sidecar, the metadata in its header equal to the sidecar's, a model spec within bounds.
    Nothing is built from a checkpoint that fails any of these."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = read_metadata(path)
    size = path.stat().st_size
    if size != sidecar["bytes"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: {size} bytes, its metadata says "
                              f"{sidecar['bytes']} (truncated or replaced); use an earlier round")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sidecar["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: sha256 {digest[:12]}... does not match the recorded "
            f"{sidecar['sha256'][:12]}... (truncated or modified file); use an earlier round"
        )
    meta = _header_metadata(data, path)
    edited = sorted(k for k in {*meta, *sidecar} - set(FILE_FACTS)
                    if meta.get(k) != sidecar.get(k))
    if edited:
        raise CheckpointError(f"checkpoint {path}: its .json differs from the metadata the "
                              f"sha256 covers in {', '.join(edited[:5])}; it was edited")
    if "model" in meta:
        from shared.rebuild import check_spec

        check_spec(meta["model"], f"checkpoint {path}")
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {err}") from None
    return tensors, {**meta, "sha256": digest, "bytes": size}
