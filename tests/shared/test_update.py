"""shared.quant.update: the uplink codec's error bound, packing, and refusal of hostile payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import Rejected
from shared.quant import weight_codes
from shared.quant.update import (
    EncodedTensor,
    decode_tensor,
    decode_update,
    encode_tensor,
    encode_update,
    pack_codes,
    packed_size,
    unpack_codes,
)

BITS = st.sampled_from([2, 3, 4, 5, 8])


@settings(max_examples=60, deadline=None)
@given(
    bits=BITS,
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    log_scale=st.floats(-30, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_decode_of_encode_is_within_half_a_scale_step(bits, shape, log_scale, seed):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    encoded = encode_tensor(delta, bits)
    q = 2 ** (bits - 1) - 1
    assert encoded.packed.dtype == np.uint8
    assert encoded.packed.size == packed_size(delta.numel(), bits)
    assert math.frexp(encoded.scale)[0] == 0.5  # a power of two
    decoded = decode_tensor(encoded.packed, encoded.scale, tuple(shape), bits)
    error = np.abs(decoded.astype(np.float64) - delta.double().numpy()).max()
    max_abs = float(delta.abs().max())
    assert error <= encoded.scale / 2 + 1e-12 * max_abs
    assert error <= max_abs / q  # the bound in terms of the update itself
    assert encoded.scale < 2 * max_abs / q or max_abs < 2.0**-60  # no wasted range


def test_codes_are_the_qat_quantizer_per_tensor():
    """One quantizer: a [1, N] weight has one output channel, so QAT codes equal update codes."""
    delta = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    codes, exponent = weight_codes(delta, 4)
    encoded = encode_tensor(delta, 4)
    assert encoded.scale == 2.0 ** float(exponent[0])
    assert np.array_equal(unpack_codes(encoded.packed, 50, 4), codes.numpy().reshape(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_unpack_round_trip_and_size(bits):
    q = 2 ** (bits - 1) - 1
    codes = np.arange(-q, q + 1).repeat(3)
    packed = pack_codes(codes, bits)
    assert packed.size == math.ceil(codes.size * bits / 8)
    assert np.array_equal(unpack_codes(packed, codes.size, bits), codes)


def test_eight_and_four_bits_take_a_quarter_and_an_eighth_of_float32():
    delta = torch.randn(1000)
    assert encode_tensor(delta, 8).packed.nbytes == 1000
    assert encode_tensor(delta, 4).packed.nbytes == 500


def test_zero_update_decodes_to_zero_and_nan_update_gets_a_nan_scale():
    assert not decode_tensor(*vars(encode_tensor(torch.zeros(5), 8)).values(), (5,), 8).any()
    encoded = encode_tensor(torch.tensor([1.0, float("nan")]), 8)
    assert math.isnan(encoded.scale)
    with pytest.raises(Rejected) as err:
        decode_tensor(encoded.packed, encoded.scale, (2,), 8)
    assert err.value.reason == "non-finite"


@pytest.mark.parametrize(
    ("packed", "scale", "reason"),
    [
        (np.full(4, 255, dtype=np.uint8), 0.5, "range"),  # 255 = code +128: outside -127..127
        (np.zeros(3, dtype=np.uint8), 0.5, "shape"),  # 3 bytes for 4 codes
        (np.zeros(4, dtype=np.int8), 0.5, "dtype"),
        (np.zeros(4, dtype=np.uint8), 0.3, "encoding"),  # not a power of two
        (np.zeros(4, dtype=np.uint8), -0.5, "encoding"),
        (np.zeros(4, dtype=np.uint8), "0.5", "encoding"),
        (np.zeros(4, dtype=np.uint8), float("inf"), "non-finite"),
    ],
)
def test_decode_refuses_a_hostile_tensor_with_its_reason(packed, scale, reason):
    with pytest.raises(Rejected) as err:
        decode_tensor(packed, scale, (2, 2), 8)
    assert err.value.reason == reason
    decode_tensor(np.zeros(4, dtype=np.uint8) + 127, 0.5, (2, 2), 8)  # the good case passes


def test_four_bit_range_check_catches_the_unused_code():
    packed = pack_codes(np.array([7, -7, 0, 3]), 4)
    assert np.array_equal(unpack_codes(packed, 4, 4), [7, -7, 0, 3])
    packed[0] |= 0x0F  # stored 15 = code +8
    with pytest.raises(Rejected, match="range"):
        unpack_codes(packed, 4, 4)


def test_update_round_trip_with_float_statistics_and_name_check():
    base = {"a": torch.randn(3, 3), "b": torch.randn(4), "bn.running_var": torch.ones(4)}
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    new["bn.running_var"] = torch.full((4,), 0.02)  # falls 1 -> 0.02: must stay positive
    encoded = encode_update(new, base, 4)
    assert isinstance(encoded["a"], EncodedTensor)
    assert encoded["bn.running_var"].dtype == np.float32  # statistics travel as float32 deltas
    arrays = {k: e.packed if isinstance(e, EncodedTensor) else e for k, e in encoded.items()}
    scales = {k: e.scale for k, e in encoded.items() if isinstance(e, EncodedTensor)}
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    decoded = decode_update(arrays, scales, shapes, 4)
    for name in ("a", "b"):
        assert np.allclose(decoded[name], (new[name] - base[name]).numpy(),
                           atol=encoded[name].scale / 2 + 1e-7)
    assert np.allclose(base["bn.running_var"].numpy() + decoded["bn.running_var"], 0.02)
    with pytest.raises(Rejected, match="names"):
        decode_update({k: arrays[k] for k in ("a", "bn.running_var")}, scales, shapes, 4)
    with pytest.raises(Rejected, match="names"):
        decode_update(arrays, {**scales, "bn.running_var": 1.0}, shapes, 4)
    nan = {**arrays, "bn.running_var": np.full(4, np.nan, np.float32)}
    with pytest.raises(Rejected, match="non-finite"):
        decode_update(nan, scales, shapes, 4)
