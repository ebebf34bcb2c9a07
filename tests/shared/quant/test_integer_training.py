"""Integer training (train-precision int8 / fp16): stochastic rounding, bit ranges, the neuron's
quantized-error backward against the step-by-step reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.quant.integer_training import (
    INT8_MAX,
    TrainPrecision,
    pow2_exponent,
    quantize_sr,
    stochastic_round,
)
from shared.snn import LIF, multistep_reference

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(value=finite, seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased(value, seed):
    n = 20_000
    x = torch.full((n,), value, dtype=torch.float64)
    rounded = stochastic_round(x, torch.Generator().manual_seed(seed))
    assert torch.equal(rounded, torch.floor(rounded))  # integers
    assert set(rounded.unique().tolist()) <= {float(torch.floor(x[0])), float(torch.ceil(x[0]))}
    frac = value - float(torch.floor(x[0]))
    # mean - value: sampling error (std <= 0.5 / sqrt(n)) plus the 16-bit noise's 2**-17
    assert abs(float(rounded.mean()) - value) <= 6 * (frac * (1 - frac) / n) ** 0.5 + 2**-16


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(finite, min_size=1, max_size=64),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_codes_stay_in_range_and_scales_are_powers_of_two(values, per_channel, seed):
    x = torch.tensor(values, dtype=torch.float32).view(len(values), 1).expand(-1, 3)
    codes, k = quantize_sr(x, 8, per_channel=per_channel,
                           generator=torch.Generator().manual_seed(seed))
    assert codes.abs().max() <= INT8_MAX and torch.equal(codes, codes.round())
    assert torch.equal(k, k.round())  # the scale 2**k is a shift
    scale = torch.exp2(k).view(-1, 1) if per_channel else torch.exp2(k)
    # one code of error at most, and the largest |x| of each group needs at most q codes
    assert ((codes * scale - x).abs() <= scale).all()


def test_exponent_is_the_smallest_that_fits():
    for max_abs in (1e-30, 0.3, 1.0, 127.0, 127.0001, 254.0, 1e6):
        k = pow2_exponent(torch.tensor(max_abs), INT8_MAX)
        assert max_abs / 2.0 ** float(k) <= INT8_MAX < max_abs / 2.0 ** (float(k) - 1)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize(("decay", "reset", "detach"), [
    (0.5, "subtract", True), (1.0, "zero", True), (0.875, "subtract", False),
])
def test_fused_backward_with_quantized_errors_equals_reference(precision, decay, reset, detach):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 5, 3, 4, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    v0 = (torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    grad_out = torch.randn(6, 5, 3, 4, generator=gen, dtype=torch.float64)

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        rounding = TrainPrecision(precision, torch.nn.Identity(), seed=3)
        x_in = x.detach().clone().requires_grad_()
        if fused:
            neuron = LIF(decay=decay, threshold=0.8, reset=reset, v_init=v0, detach_reset=detach)
            neuron.error_quantizer = rounding.round_error_
            spikes = neuron(x_in)
        else:
            spikes, _ = multistep_reference(
                x_in, LIF(surrogate="atan").surrogate, decay=decay, threshold=0.8, reset=reset,
                v_init=v0, detach_reset=detach, error_quantizer=rounding.round_error_,
            )
        return spikes, *torch.autograd.grad(spikes, (x_in, v0), grad_out)

    spikes, gx, gv = run(fused=True)
    ref_spikes, gx_ref, gv_ref = run(fused=False)
    assert torch.equal(spikes, ref_spikes)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(gv, gv_ref, atol=1e-12, rtol=0)
    plain = torch.autograd.grad(
        LIF(decay=decay, threshold=0.8, reset=reset, v_init=v0, detach_reset=detach)(x), x,
        grad_out)[0]
    assert not torch.equal(gx, plain)  # the errors really were rounded
    if precision == "int8":  # every step's error is int8 codes times one power of two
        for step in gx:
            codes = step / torch.exp2(pow2_exponent(step.abs().max(), INT8_MAX))
            assert torch.equal(codes, codes.round()) and codes.abs().max() <= INT8_MAX
    else:
        assert torch.equal(gx, gx.half().double())


def test_neuron_without_quantizer_takes_the_float_path():
    neuron = LIF()
    assert neuron.error_quantizer is None
    with TrainPrecision("int8", torch.nn.Sequential(neuron)):
        assert neuron.error_quantizer is not None
    assert neuron.error_quantizer is None  # detached again
    with pytest.raises(ValueError, match="train precision"):
        TrainPrecision("int4", neuron)
