"""Quantization-aware training (QAT) of spiking nets and the BN fold shared with the integer engine.

`quantize(model, bits)` copies a zoo `csnn` or `mlp` and swaps its synaptic layers for fake-quant
ones (`QConv2d`, `QLinear`) and its neurons for `QLIF`; the parameter names stay the same, so the
state dict of a float model loads into its quantized twin and back.

- Training mode: float shadow weights, fake-quantized weights and 8-bit input pixels with
  straight-through gradients, BatchNorm on batch statistics, float LIF dynamics with the leak
  decay 1 - 2**-k. All parameters and BN statistics stay float, so a federation averages floats
  (with train-precision int8, `shared.quant.integer_training`, each client's shadow weights are
  int8 codes times powers of two, still float tensors; the average is re-rounded on arrival).
- Eval mode: the integer computation, carried out on float tensors holding integers. Every
  spiking stage (synapse -> BN -> neuron) is folded (`fold_spiking`) into

      I[t] = sign_c * (A[t] << f_c) + B_c          A = integer accumulator (codes x input codes)
      spike when the integer membrane reaches Theta_c

  where BN's scale becomes the per-channel membrane unit (a shift f_c of fractional bits), its
  offset the integer bias B_c and the threshold the integer Theta_c. The readout sums the integer
  accumulators over T and aligns channels by shifts. `to_integer` exports exactly these integers,
  so the eval-mode forward and the `IntegerModel` agree bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shared.snn import LIF, SpikingNet, over_time
from shared.snn.models import CSNN, MLP

from .fake import (
    FLOAT_EXACT,
    QLIF,
    QConv2d,
    QLinear,
    QuantError,
    check_bits,
    round_ste,
    weight_codes,
)

PIXEL_LEVELS = 255  # direct-coded images are 8-bit: x = u8 / 255
TARGET_THETA_BITS = 12  # fractional bits are added until a threshold spans ~2**12 membrane LSBs


@dataclass(frozen=True)
class Spiking:
    """Stage: synaptic layer -> BatchNorm -> spiking neuron (input codes up to `input_max`)."""

    synapse: str
    norm: str
    neuron: str
    input_scale: float  # value of one input code (1/255 pixels, 1/4 pooled spikes, 1 spikes)
    input_max: int
    flatten: bool = False


@dataclass(frozen=True)
class SumPool:
    """Stage: 2x2 average pooling of spikes; the next layer reads the spike counts (0..4)."""

    name: str


@dataclass(frozen=True)
class Readout:
    """Stage: non-spiking linear readout, summed over the T steps."""

    synapse: str
    input_scale: float
    input_max: int
    flatten: bool = True


Stage = Spiking | SumPool | Readout

STAGES: dict[type[SpikingNet], tuple[Stage, ...]] = {
    CSNN: (
        Spiking("conv1", "bn1", "sn1", 1 / PIXEL_LEVELS, PIXEL_LEVELS),
        SumPool("pool1"),
        Spiking("conv2", "bn2", "sn2", 1 / 4, 4),
        SumPool("pool2"),
        Readout("fc", 1 / 4, 4),
    ),
    MLP: (
        Spiking("fc1", "bn1", "sn1", 1 / PIXEL_LEVELS, PIXEL_LEVELS, flatten=True),
        Readout("fc2", 1.0, 1),
    ),
}


@dataclass
class SpikingFold:
    """Integer parameters of one spiking stage (integer-valued float64 tensors, per channel)."""

    codes: Tensor  # weight codes with the channel sign folded in (what the engine stores)
    sign: Tensor  # +1 / -1 per channel: the sign of BN's scale
    shift: Tensor  # fractional bits f_c
    bias: Tensor  # B_c
    theta: Tensor  # Theta_c >= 1
    v_init: Tensor  # initial membrane
    leak_shift: int | None
    subtract: bool
    bound: int  # static bound on |membrane| and |current| over T steps


@dataclass
class ReadoutFold:
    """int_logits = ((sum_t A[t] << frac) + T * B_c) << align_c;  logits = int_logits * scale."""

    codes: Tensor
    frac: int  # fractional bits of the bias (same for all channels)
    bias: Tensor  # B_c, added once per time step, in units of 2**(e_c - frac) * input_scale
    shift: Tensor  # align_c = e_c - e_min: aligns channels to the common scale
    exponent: Tensor  # e_c (the weight scale 2**e_c)
    output_scale: float
    bound: int


def time_norm_shift(time_steps: int) -> int:
    """L with 2**L >= T: the readout sums over T and scales by 2**-L (the mean when T = 2**L)."""
    return max(0, math.ceil(math.log2(time_steps)))


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view(-1, *([1] * (ndim - 2)))


def fold_spiking(model: SpikingNet, stage: Spiking) -> SpikingFold:
    """Fold synapse codes, BN (running statistics) and the neuron into integer parameters."""
    syn, bn = getattr(model, stage.synapse), getattr(model, stage.norm)
    neuron: QLIF = getattr(model, stage.neuron)
    codes, exponent = weight_codes(syn.weight, syn.bits)
    codes, exponent = codes.double(), exponent.double()
    inv_std = (bn.running_var.double() + bn.eps).rsqrt()
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    gain = gamma * inv_std * torch.exp2(exponent) * stage.input_scale  # current per LSB of A
    offset = beta - gamma * inv_std * bn.running_mean.double()
    if syn.bias is not None:
        offset = offset + gamma * inv_std * syn.bias.detach().double()
    sign = torch.where(gain < 0, -1.0, 1.0).double()
    unit0 = gain.abs().clamp_min(1e-30)
    threshold = neuron.threshold
    if threshold <= 0:
        raise QuantError(f"{stage.neuron}: threshold must be > 0 to quantize, got {threshold}")
    v0 = float(neuron.v_init) if not isinstance(neuron.v_init, Tensor) else neuron.v_init.double()
    steps = model.time_steps
    fan_in = codes.abs().flatten(1).sum(1) * stage.input_max
    # |membrane| <= |v0| + T * max|I|, in units of the accumulator LSB before the shift
    bound0 = torch.as_tensor(v0).abs() / unit0 + steps * (fan_in + offset.abs() / unit0)
    bound0 = bound0 + steps + 1  # rounding of B and v0
    f_target = torch.floor(TARGET_THETA_BITS - torch.log2(threshold / unit0))
    f_max = torch.floor(torch.log2((FLOAT_EXACT - 1) / bound0))
    shift = torch.clamp(torch.minimum(f_target, f_max), 0, 30)
    unit = unit0 * torch.exp2(-shift)
    theta = torch.clamp(torch.round(threshold / unit), 1, FLOAT_EXACT // 2)
    bias = torch.clamp(torch.round(offset / unit), -(FLOAT_EXACT // 2), FLOAT_EXACT // 2)
    v_init = torch.round(torch.as_tensor(v0, dtype=torch.float64) / unit)
    current = fan_in * torch.exp2(shift) + bias.abs()
    bound = int((v_init.abs() + steps * current + theta).max())
    if bound >= FLOAT_EXACT:
        raise QuantError(
            f"{stage.synapse}: the membrane may reach {bound} >= 2**24 over {steps} steps, "
            "beyond exact float32 emulation (and near int32 limits); use fewer time steps or bits"
        )
    return SpikingFold(
        codes * sign.view(-1, *([1] * (codes.dim() - 1))), sign, shift, bias, theta, v_init,
        neuron.leak_shift, neuron.reset == "subtract", bound,
    )


def fold_readout(model: SpikingNet, stage: Readout) -> ReadoutFold:
    syn = getattr(model, stage.synapse)
    codes, exponent = weight_codes(syn.weight, syn.bits)
    codes, exponent = codes.double(), exponent.double()
    steps = model.time_steps
    fan_in = steps * codes.abs().sum(1) * stage.input_max  # |sum_t A| before the shift
    bias = syn.bias.detach().double() if syn.bias is not None else torch.zeros_like(exponent)
    scaled_bias = bias.abs() / (torch.exp2(exponent) * stage.input_scale)  # in units of A
    # as many fractional bits as keep (|sum A| + T |B|) float32-exact, at most 16
    worst = float((fan_in + steps * scaled_bias).max()) + steps
    frac = int(max(0, min(16, math.floor(math.log2((FLOAT_EXACT - 1) / max(worst, 1.0))))))
    b_int = torch.round(bias / (torch.exp2(exponent - frac) * stage.input_scale))
    pre_shift = fan_in * 2**frac + steps * b_int.abs()
    e_min = exponent.min()
    shift = exponent - e_min
    bound = int((pre_shift * torch.exp2(shift)).max())
    if int(pre_shift.max()) >= FLOAT_EXACT or bound >= 2**31:
        raise QuantError(
            f"{stage.synapse}: readout accumulator bound {bound} overflows "
            "(float32-exact 2**24 before / int32 after channel alignment)"
        )
    output_scale = math.ldexp(stage.input_scale, int(e_min) - frac - time_norm_shift(steps))
    return ReadoutFold(codes, frac, b_int, shift, exponent, output_scale, bound)


def _quantized_child(module: nn.Module, bits: int) -> nn.Module:
    if isinstance(module, nn.Conv2d) and not isinstance(module, QConv2d):
        q = QConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                    module.padding, module.dilation, module.groups, module.bias is not None)
    elif isinstance(module, nn.Linear) and not isinstance(module, QLinear):
        q = QLinear(module.in_features, module.out_features, module.bias is not None)
    elif isinstance(module, LIF) and not isinstance(module, QLIF):
        return QLIF.from_neuron(module)
    else:
        return module  # already a private copy
    q.load_state_dict(module.state_dict())
    q.bits = bits
    return q


class QuantizedMixin:
    """Eval-mode integer path for a quantized zoo model (see the module docstring)."""

    bits: int
    stages: tuple[Stage, ...]

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            if x.dim() == self.in_dims:  # 8-bit input pixels, straight-through
                x = round_ste(x.clamp(0, 1) * PIXEL_LEVELS) / PIXEL_LEVELS
            return super().forward(x)  # type: ignore[misc]
        return self.integer_forward(x)

    @torch.no_grad()
    def integer_forward(self, x: Tensor) -> Tensor:
        """Eval path: integer arithmetic on float32 tensors; returns logits (float32)."""
        steps = self.time_steps
        static = x.dim() == self.in_dims  # direct coding: one input for all T steps
        # an event is a full-scale input (1.0), i.e. pixel code 255: one input unit for both
        codes = torch.round(x.clamp(0, 1) * PIXEL_LEVELS) if static else x * PIXEL_LEVELS
        for stage in self.stages:
            if isinstance(stage, SumPool):  # spike counts of each 2x2 window (exact: sum/4*4)
                codes = over_time(getattr(self, stage.name), codes) * 4
                continue
            acc = self._accumulate(stage, codes, static)
            if isinstance(stage, Readout):
                fold = fold_readout(self, stage)
                total = (acc * steps if static else acc.sum(0)) * 2.0**fold.frac
                total = total + steps * fold.bias.to(total.dtype)
                scale = torch.exp2(fold.exponent - fold.frac).to(total.dtype) * stage.input_scale
                return total * scale * 2.0 ** -time_norm_shift(steps)
            fold = fold_spiking(self, stage)
            ch = acc.dim() - (1 if static else 2) + 1  # rank of one step [B, C, ...]
            sign, shift, bias, theta, v0 = (
                _per_channel(t.float(), ch)
                for t in (fold.sign, fold.shift, fold.bias, fold.theta, fold.v_init)
            )
            current = acc * sign * torch.exp2(shift) + bias
            if static:
                current = current.unsqueeze(0).expand(steps, *current.shape)
                static = False
            codes = getattr(self, stage.neuron)(current, theta, v0)
        raise QuantError("model has no readout stage")

    def _accumulate(self, stage: Spiking | Readout, codes: Tensor, static: bool) -> Tensor:
        """Integer accumulator A of a stage's synaptic layer on input codes (no bias)."""
        layer = getattr(self, stage.synapse)

        def apply(u: Tensor) -> Tensor:
            return layer(u.flatten(1) if stage.flatten else u, integer=True)

        return apply(codes) if static else over_time(apply, codes)


_QUANT_CLASSES: dict[type[SpikingNet], type] = {}


def quantize(model: SpikingNet, bits: int = 4) -> SpikingNet:
    """A quantization-aware copy of zoo model `model` (`csnn` or `mlp`); `model` is untouched."""
    check_bits(bits)
    base = type(model)
    if base not in STAGES:
        if isinstance(model, QuantizedMixin):
            raise QuantError("model is already quantized")
        known = ", ".join(c.__name__ for c in STAGES)
        raise QuantError(f"quantize supports {known} models, got {base.__name__}")
    cls = _QUANT_CLASSES.setdefault(base, type(f"Quantized{base.__name__}", (QuantizedMixin, base),
                                                {}))
    q = copy.deepcopy(model)  # nothing (hooks, buffers, state) is shared with the input model
    q.__class__ = cls
    for name, child in list(q.named_children()):
        setattr(q, name, _quantized_child(child, bits))
    q.bits = bits
    q.stages = STAGES[base]
    q.train(model.training)
    return q
