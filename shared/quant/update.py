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

Decoding checks everything a hostile sender controls (dtype, length, code range, the scale being
a finite power of two) and raises `UpdateError` with a short `reason` the server counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .fake import check_bits, pow2_codes

FULL_PRECISION = 32  # update-bits = 32: no compression, the client sends its float32 weights


class UpdateError(ValueError):
    """An update that cannot be decoded or accepted; `reason` is one short word for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
        raise UpdateError("dtype", f"codes must be a 1-d uint8 array, got {packed.dtype} "
                          f"{list(packed.shape)}")
    if packed.size != packed_size(numel, bits):
        raise UpdateError("shape", f"{packed.size} code bytes for {numel} values at {bits} bits "
                          f"(expected {packed_size(numel, bits)})")
    planes = np.unpackbits(packed, count=numel * bits, bitorder="little").reshape(numel, bits)
    stored = planes.astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))
    q = qmax(bits)
    outside = int((stored > 2 * q).sum())
    if outside:
        raise UpdateError("range", f"{outside} codes outside -{q}..{q}")
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
        raise UpdateError("encoding", f"scale {scale!r} is not a number")
    if not math.isfinite(scale):
        raise UpdateError("non-finite", f"scale is {scale}")
    if scale <= 0 or math.frexp(scale)[0] != 0.5:
        raise UpdateError("encoding", f"scale {scale!r} is not a power of two")
    return float(scale)


def decode_tensor(
    packed: np.ndarray, scale: object, shape: tuple[int, ...], bits: int
) -> np.ndarray:
    """delta_hat = code * scale as float32 of `shape`; raises `UpdateError` on anything off."""
    value = check_scale(scale)
    numel = math.prod(shape)
    codes = unpack_codes(packed, numel, bits)
    return (codes.astype(np.float64) * value).astype(np.float32).reshape(shape)


def encode_update(
    new: Mapping[str, Tensor], base: Mapping[str, Tensor], bits: int
) -> dict[str, EncodedTensor]:
    """Encode new - base for every tensor of `base` (the global weights the client received)."""
    if new.keys() != base.keys():
        raise ValueError(f"update names {sorted(new)} differ from the global {sorted(base)}")
    return {name: encode_tensor(new[name].float() - base[name].float(), bits) for name in base}


def decode_update(
    encoded: Mapping[str, EncodedTensor], shapes: Mapping[str, tuple[int, ...]], bits: int
) -> dict[str, np.ndarray]:
    """The float32 deltas of an encoded update whose tensors must be exactly `shapes`' names."""
    if set(encoded) != set(shapes):
        missing, extra = sorted(set(shapes) - set(encoded)), sorted(set(encoded) - set(shapes))
        raise UpdateError("names", f"missing {missing}, unexpected {extra}")
    return {
        name: decode_tensor(encoded[name].packed, encoded[name].scale, shape, bits)
        for name, shape in shapes.items()
    }
