"""Fake quantization: straight-through rounding, power-of-two weight scales, the integer neuron.

Weights are symmetric, narrow range and per output channel:

    q = 2**(bits-1) - 1                      (7 for 4 bits: codes -7..7, -8 unused)
    e_c = ceil(log2(max|w_c| / q))           (per-channel exponent: the scale 2**e_c is a shift)
    w_int = clamp(round(w / 2**e_c), -q, q)  w_hat = w_int * 2**e_c

Training keeps float shadow weights `w` and uses `w_hat` in the forward; rounding passes the
gradient straight through (STE), so d w_hat / d w = 1. With train-precision int8 the shadow weights
are themselves int8 codes times a power-of-two scale per channel, updated with stochastic rounding
(`shared.quant.integer_training`); `w_hat` is derived from them the same way.

The integer neuron is the spiking neuron on integer membrane potentials (in units of one
membrane LSB): with current I[t], threshold Theta and leak shift k (LIF decay 1 - 2**-k),

    h[t] = v[t-1] - floor(v[t-1] / 2**k) + I[t]       (IF: no leak term)
    s[t] = h[t] >= Theta
    v[t] = h[t] - Theta * s[t]   or   h[t] * (1 - s[t])   (reset by subtraction / to zero)

`integer_neuron` runs it on int32 tensors (the integer engine, `>>` is an arithmetic shift, i.e.
floor) or on float tensors holding integers (the fake-quant eval path, `floor(v * 2**-k)`); the two
agree bit for bit while every value stays below 2**24, which export checks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.snn import LIF

FLOAT_EXACT = 2**24  # integers up to this magnitude are exact in float32


class QuantError(ValueError):
    """A model or setting that cannot be quantized or exported (one-line message)."""


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantError(f"weight bits must be an integer in 2..8, got {bits!r}")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward, identity in the backward."""
    return x + (torch.round(x) - x).detach()


def pow2_codes(x: Tensor, bits: int, *, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(x_int, e): the symmetric narrow-range power-of-two quantizer of this module's docstring.

    Codes (a float tensor of integers in [-q, q]) and exponents, one per output channel (dim 0)
    with `per_channel`, else one for the whole tensor (0-d). The same quantizer encodes weights
    for QAT and weight updates for the uplink (`shared.quant.update`), so there is one rounding
    rule, not two.
    """
    qmax = 2 ** (bits - 1) - 1
    x = x.detach()
    max_abs = x.abs().flatten(1).amax(1) if per_channel else x.abs().amax()
    exponent = torch.ceil(torch.log2(max_abs.clamp_min(2.0**-60) / qmax))
    scale = torch.exp2(exponent)
    if per_channel:
        scale = scale.view(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(torch.round(x / scale), -qmax, qmax), exponent


def weight_codes(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(w_int, e): integer codes (float tensor) and per-output-channel exponents, for `weight`."""
    return pow2_codes(weight, bits, per_channel=True)


def fake_quant_weight(weight: Tensor, bits: int) -> Tensor:
    """w_hat = w_int * 2**e with a straight-through gradient to the float shadow weight."""
    codes, exponent = weight_codes(weight, bits)
    scale = torch.exp2(exponent).view(-1, *([1] * (weight.dim() - 1)))
    return weight + (codes * scale - weight).detach()


class QConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward uses the fake-quantized weight (float shadow weight kept)."""

    bits: int = 4

    def forward(self, x: Tensor, integer: bool = False) -> Tensor:
        if integer:  # the integer accumulator: codes x input codes, no bias
            return self._conv_forward(x, weight_codes(self.weight, self.bits)[0], None)
        return self._conv_forward(x, fake_quant_weight(self.weight, self.bits), self.bias)


class QLinear(nn.Linear):
    """`nn.Linear` whose forward uses the fake-quantized weight (float shadow weight kept)."""

    bits: int = 4

    def forward(self, x: Tensor, integer: bool = False) -> Tensor:
        if integer:  # the integer accumulator: codes x input codes, no bias
            return F.linear(x, weight_codes(self.weight, self.bits)[0])
        return F.linear(x, fake_quant_weight(self.weight, self.bits), self.bias)


def leak_shift(decay: float) -> int | None:
    """k with decay == 1 - 2**-k (None for IF, decay 1); other decays have no shift form."""
    if decay == 1.0:
        return None
    k = -math.log2(1.0 - decay)
    if not (k > 0 and k == round(k)):
        raise QuantError(
            f"LIF decay {decay} is not 1 - 2**-k, so its leak is not a shift; use decay 0.5, "
            "0.75, 0.875, ... (k = 1, 2, 3, ...)"
        )
    return int(k)


def shift_floor(v: Tensor, k: int) -> Tensor:
    """floor(v / 2**k): an arithmetic right shift for integer tensors."""
    if v.dtype.is_floating_point:
        return torch.floor(v * 2.0**-k)
    return v >> k


def integer_neuron(
    current: Tensor, theta: Tensor, v_init: Tensor, shift: int | None, subtract: bool
) -> tuple[Tensor, Tensor]:
    """Run the integer neuron over `[T, B, C, ...]` currents; returns (spikes, membrane h).

    `theta` and `v_init` broadcast against one step `[B, C, ...]` (per-channel values).
    """
    spikes = torch.empty_like(current)
    membrane = torch.empty_like(current)
    v = v_init
    for t in range(current.shape[0]):
        if shift is not None:
            v = v - shift_floor(v, shift)
        h = torch.add(v, current[t], out=membrane[t])
        fired = h >= theta
        spikes[t] = fired
        v = h - theta * spikes[t] if subtract else h.masked_fill(fired, 0)
    return spikes, membrane


class QLIF(LIF):
    """A LIF/IF neuron for quantized models: float dynamics in training (decay 1 - 2**-k), and
    integer dynamics when called with integer parameters (the eval path of `QuantizedNet`)."""

    @classmethod
    def from_neuron(cls, neuron: LIF) -> QLIF:
        q = cls(neuron.decay, neuron.threshold, neuron.reset, neuron.v_init, neuron.surrogate,
                neuron.detach_reset)
        q.leak_shift = leak_shift(neuron.decay)
        return q

    def forward(  # type: ignore[override]
        self, x_seq: Tensor, theta: Tensor | None = None, v_init: Tensor | None = None
    ) -> Tensor:
        if theta is None:
            return super().forward(x_seq)
        spikes, membrane = integer_neuron(
            x_seq, theta, v_init, self.leak_shift, self.reset == "subtract"
        )
        self.membrane = membrane if self.record_membrane else None
        return spikes
