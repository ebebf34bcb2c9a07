"""Compressed model updates for the uplink: integer codes with one power-of-two scale per tensor.

A client sends, for every federated tensor, its update delta = w_new - w_global (the global weights
it received), quantized by the same symmetric narrow-range power-of-two rule as the QAT weights
(`pow2_codes`), with one exponent for the whole tensor:

    q = 2**(bits-1) - 1                          (127 for 8 bits, 7 for 4 bits)
    e = ceil(log2(max|delta| / q))               scale = 2**e
    code = clamp(round(delta / scale), -q, q)    delta_hat = code * scale

so |delta_hat - delta| <= scale / 2 <= max|delta| / q per element. The codes travel packed, `bits`
bits each, stored as code + q (0..2q; the value 2**bits - 1 is never produced, so it is out of
range), in `packed_size(numel, bits)` bytes; the scale travels as a float. A tensor holding a
non-finite value cannot be coded: it goes out as zero codes with a NaN scale, so the server sees
(and rejects) a non-finite update rather than the client crashing.

BatchNorm running statistics (`STATISTICS`: a few values per channel) travel as float32 deltas:
a running variance must stay positive, and a coarse per-tensor code cannot promise that (at 4 bits
the first round's variances, all falling from 1 to ~0.05, decode to exactly 0).

Decoding checks everything a hostile sender controls (dtype, length, code range, the scale being
a finite power of two) and raises `Rejected` with a short `reason` the server counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from shared.errors import Rejected

from .fake import check_bits, pow2_codes

FULL_PRECISION = 32  # update-bits = 32: no compression, the client sends its float32 weights
STATISTICS = ("running_mean", "running_var")  # tensors whose update travels as float32


def is_coded(name: str) -> bool:
    """Whether tensor `name`'s update travels as integer codes (else as a float32 delta)."""
    return not name.endswith(STATISTICS)


@dataclass(frozen=True)
class EncodedTensor:
    """One tensor's update on the wire: packed codes (uint8 [packed_size]) and its scale 2**e."""

    packed: np.ndarray
    scale: float


def qmax(bits: int) -> int:
    return 2 ** (check_bits(bits) - 1) - 1


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    return (numel * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes in [-q, q] -> uint8 [packed_size], `bits` bits each (little-endian bits)."""
    stored = (np.asarray(codes, dtype=np.int16).reshape(-1) + qmax(bits)).astype(np.uint8)
    planes = (stored[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, numel: int, bits: int) -> np.ndarray:
    """The inverse of `pack_codes` (int32 codes [numel]); refuses a wrong dtype, length or range."""
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise Rejected("dtype", f"codes must be a 1-d uint8 array, got {packed.dtype} "
                          f"{list(packed.shape)}")
    if packed.size != packed_size(numel, bits):
        raise Rejected("shape", f"{packed.size} code bytes for {numel} values at {bits} bits "
                          f"(expected {packed_size(numel, bits)})")
    planes = np.unpackbits(packed, count=numel * bits, bitorder="little").reshape(numel, bits)
    stored = planes.astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))
    q = qmax(bits)
    outside = int((stored > 2 * q).sum())
    if outside:
        raise Rejected("range", f"{outside} codes outside -{q}..{q}")
    return stored - q


def encode_tensor(delta: Tensor, bits: int) -> EncodedTensor:
    """Quantize one update tensor with a per-tensor power-of-two scale and pack its codes."""
    delta = delta.detach().to(torch.float64)  # float64: the exponent of any float32 is exact
    if not bool(torch.isfinite(delta).all()):
        codes = np.zeros(delta.numel(), dtype=np.int16)
        return EncodedTensor(pack_codes(codes, bits), math.nan)
    codes, exponent = pow2_codes(delta, bits, per_channel=False)
    return EncodedTensor(pack_codes(codes.numpy(), bits), math.ldexp(1.0, int(exponent)))


def check_scale(scale: object) -> float:
    """A scale must be a finite positive power of two (it is 2**e)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise Rejected("encoding", f"scale {scale!r} is not a number")
    if not math.isfinite(scale):
        raise Rejected("non-finite", f"scale is {scale}")
    if scale <= 0 or math.frexp(scale)[0] != 0.5:
        raise Rejected("encoding", f"scale {scale!r} is not a power of two")
    return float(scale)


def decode_tensor(
    packed: np.ndarray, scale: object, shape: tuple[int, ...], bits: int
) -> np.ndarray:
    """delta_hat = code * scale as float32 of `shape`; raises `Rejected` on anything off."""
    value = check_scale(scale)
    numel = math.prod(shape)
    codes = unpack_codes(packed, numel, bits)
    return (codes.astype(np.float64) * value).astype(np.float32).reshape(shape)


def check_float(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape` with finite values (a statistics delta, or full weights)."""
    if value.dtype != np.float32:
        raise Rejected("dtype", f"{value.dtype}, expected float32")
    if value.shape != tuple(shape):
        raise Rejected("shape", f"{list(value.shape)}, expected {list(shape)}")
    if not np.isfinite(value).all():
        raise Rejected("non-finite", "holds NaN or inf")
    return value


def encode_update(
    new: Mapping[str, Tensor], base: Mapping[str, Tensor], bits: int
) -> dict[str, EncodedTensor | np.ndarray]:
    """Encode new - base for every tensor of `base` (the global weights the client received):
    an `EncodedTensor` where `is_coded(name)`, else the float32 delta."""
    if new.keys() != base.keys():
        raise ValueError(f"update names {sorted(new)} differ from the global {sorted(base)}")
    out: dict[str, EncodedTensor | np.ndarray] = {}
    for name in base:
        delta = new[name].detach().float() - base[name].detach().float()
        out[name] = encode_tensor(delta, bits) if is_coded(name) else delta.numpy()
    return out


def decode_update(
    arrays: Mapping[str, np.ndarray],
    scales: Mapping[str, object],
    shapes: Mapping[str, tuple[int, ...]],
    bits: int,
) -> dict[str, np.ndarray]:
    """The float32 deltas of an update sent as `arrays` (packed codes, or float32 deltas for the
    statistics) and `scales` (one per coded tensor); its names must be exactly those of `shapes`.
    Raises `Rejected` with the first problem found."""
    coded = {name for name in shapes if is_coded(name)}
    if set(arrays) != set(shapes) or set(scales) != coded:
        missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
        raise Rejected("names", f"tensors missing {missing[:5]}, unexpected {extra[:5]}, "
                          f"or scales not exactly those of the coded tensors")
    deltas = {}
    for name, shape in shapes.items():
        try:
            if name in coded:
                deltas[name] = decode_tensor(arrays[name], scales[name], shape, bits)
            else:
                deltas[name] = check_float(arrays[name], shape)
        except Rejected as err:
            raise Rejected(err.reason, f"{name}: {err.detail}") from None
    return deltas
