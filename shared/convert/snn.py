"""Conversion proper: a QC-ANN becomes a spiking network of `shared.snn` IF neurons.

    synapse (+ BN)  ->  one synapse, BN folded:  w' = w g / s,  b' = (b - mu) g / s + beta
    QC activation   ->  IF neuron: threshold theta, reset by subtraction, initial potential theta/2
    average pooling, flatten, dropout, identity  ->  the same stateless layer
    ResidualBlock   ->  ConvertedBlock: the shortcut is extra input current of the second neuron

Spikes stay binary (what the chip model and the attacks expect), so a neuron's value theta * s is
carried by the layers it feeds: every synapse reading the output of a neuron with threshold theta
has its weight multiplied by theta (an identity shortcut becomes a `Scale(theta)`). The linear
maps are the ANN's; only where theta sits changes. Input is direct-coded (the analog image is the
input current of every step; the layers before the first neuron run once and are broadcast over
T) or event frames `[T, B, ...]`, exactly as for `shared.snn.build_model` models. The readout (the
last synapse, no neuron after it) is averaged over the T steps, so the logits are the readout of
the time-averaged values theta * N / T.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from shared.quant.fake import QConv2d, QLinear, fake_quant_weight
from shared.snn import IF, LIF, SpikingNet, over_time
from shared.snn.models import AvgPool2x2

from .qc import NORMS, SYNAPSES, ConvertError, QCActivation, ResidualBlock, leaf_layers


class Scale(nn.Module):
    """Multiply by a constant (a neuron's threshold carried into the current it feeds)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def _effective_weight(layer: nn.Module) -> Tensor:
    """The weight the layer computes with (fake-quantized for `shared.quant` layers)."""
    if isinstance(layer, QConv2d | QLinear):
        return fake_quant_weight(layer.weight, layer.bits).detach()
    return layer.weight.detach()


@torch.no_grad()
def fold(synapse: nn.Module, norm: nn.Module | None, input_scale: float) -> nn.Module:
    """A plain `nn.Conv2d` / `nn.Linear` computing `norm(synapse(input_scale * x))` (eval BN)."""
    weight = _effective_weight(synapse).clone()
    out = weight.shape[0]
    bias = synapse.bias.detach().clone() if synapse.bias is not None else weight.new_zeros(out)
    if norm is not None:
        if norm.running_mean is None:
            raise ConvertError(f"{type(norm).__name__} without running statistics cannot be folded")
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        bias = (bias - norm.running_mean) * scale
        if norm.bias is not None:
            bias = bias + norm.bias
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    weight = weight * input_scale
    if isinstance(synapse, nn.Conv2d):
        folded: nn.Module = nn.Conv2d(
            synapse.in_channels, synapse.out_channels, synapse.kernel_size,
            stride=synapse.stride, padding=synapse.padding, dilation=synapse.dilation,
            groups=synapse.groups, bias=True, padding_mode=synapse.padding_mode,
        )
    else:
        folded = nn.Linear(synapse.in_features, synapse.out_features, bias=True)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded.to(weight.device)


def neuron_for(activation: QCActivation) -> IF:
    """The IF neuron of a QC activation: threshold theta, reset by subtraction, v_init theta/2.

    `v_init` is a Parameter (a scalar here; phase 2 makes it one value per neuron)."""
    theta = float(activation.theta.detach())
    if not theta > 0:
        raise ConvertError(f"QC threshold theta must be > 0 to convert, got {theta}")
    neuron = IF(threshold=theta, reset="subtract")
    neuron.v_init = nn.Parameter(activation.theta.detach().clone() / 2)
    return neuron


def _stateless(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.AvgPool2d) and layer.kernel_size in (2, (2, 2)) and \
            layer.stride in (2, (2, 2)) and not layer.ceil_mode:
        return AvgPool2x2()  # the same values, faster on CPU
    if isinstance(layer, nn.Dropout):
        return nn.Identity()
    return copy.deepcopy(layer)


class ConvertedBlock(nn.Module):
    """Spiking residual block: s1 = act1(conv1(x)); out = act2(conv2(s1) + shortcut(x)).

    `x` and the outputs are `[T, B, C, H, W]` spikes; BN is folded into the convolutions and the
    upstream thresholds into their weights (see the module docstring)."""

    def __init__(self, block: ResidualBlock, input_scale: float) -> None:
        super().__init__()
        for name in ("act1", "act2"):
            if not isinstance(getattr(block, name), QCActivation):
                raise ConvertError(f"residual block activation '{name}' is not a QC activation; "
                                   "call to_qc_ann first")
        self.conv1 = fold(block.conv1, block.bn1, input_scale)
        self.act1 = neuron_for(block.act1)
        self.conv2 = fold(block.conv2, block.bn2, self.act1.threshold)
        if isinstance(block.shortcut, nn.Sequential):
            conv, norm = block.shortcut
            self.shortcut: nn.Module = fold(conv, norm, input_scale)
        else:
            self.shortcut = Scale(input_scale) if input_scale != 1.0 else nn.Identity()
        self.act2 = neuron_for(block.act2)

    def forward(self, x_seq: Tensor) -> Tensor:
        s1 = self.act1(over_time(self.conv1, x_seq))
        return self.act2(over_time(self.conv2, s1) + over_time(self.shortcut, x_seq))


class ConvertedSNN(SpikingNet):
    """The SNN converted from a QC-ANN: layers in forward order; those before the first neuron
    form the head (run once for direct coding), the rest the body on `[T, B, ...]`.

    Called like a zoo model: `[B, ...]` direct coding or `[T, B, ...]` event frames -> logits.
    `synapses[name]` lists, for each neuron, the synaptic layers feeding it (phase 2 calibrates
    them)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], time_steps: int, in_dims: int,
                 out_scale: float = 1.0) -> None:
        super().__init__(time_steps, in_dims)
        self.layers = nn.Sequential(layers)
        stateful = [i for i, m in enumerate(self.layers) if isinstance(m, LIF | ConvertedBlock)]
        if not stateful:
            raise ConvertError("the model has no activation to turn into a spiking neuron")
        self.n_head = stateful[0]
        self.out_scale = float(out_scale)

    def head(self, x: Tensor) -> Tensor:
        for layer in self.layers[: self.n_head]:
            x = layer(x)
        return x

    def body(self, z_seq: Tensor) -> Tensor:
        for layer in self.layers[self.n_head :]:
            if isinstance(layer, LIF | ConvertedBlock):
                z_seq = layer(z_seq)
            else:
                z_seq = over_time(layer, z_seq)
        return z_seq

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out * self.out_scale if self.out_scale != 1.0 else out


def convert(qc_ann: nn.Module, time_steps: int, in_dims: int = 4) -> ConvertedSNN:
    """Phase-1 conversion (no calibration) of `qc_ann` (eval-mode BN statistics), which is left
    untouched. `in_dims` is the rank of a direct-coded input batch (4 for `[B, C, H, W]`)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    pending: tuple[str, nn.Module, float] | None = None  # a synapse waiting for its BatchNorm
    scale = 1.0  # value of one unit of the current tensor (theta after a neuron)
    for name, layer in leaf_layers(qc_ann):
        key = name.replace(".", "_")
        if isinstance(layer, NORMS):
            if pending is None:
                raise ConvertError(f"layer '{name}' ({type(layer).__name__}) must directly follow "
                                   "a Conv2d or Linear so that it can be folded")
            layers[pending[0]] = fold(pending[1], layer, pending[2])
            pending = None
            continue
        if pending is not None:
            layers[pending[0]] = fold(pending[1], None, pending[2])
            pending = None
        if isinstance(layer, SYNAPSES):
            pending, scale = (key, layer, scale), 1.0
        elif isinstance(layer, nn.ReLU):
            raise ConvertError(f"layer '{name}' is a ReLU, not a clip-quantize activation; "
                               "call to_qc_ann(model, time_steps) and fine-tune it first")
        elif isinstance(layer, QCActivation):
            if scale != 1.0:
                layers[f"{key}_scale"] = Scale(scale)
            neuron = layers[key] = neuron_for(layer)
            scale = neuron.threshold
        elif isinstance(layer, ResidualBlock):
            block = layers[key] = ConvertedBlock(layer, scale)
            scale = block.act2.threshold
        else:
            layers[key] = _stateless(layer)
    if pending is not None:
        layers[pending[0]] = fold(pending[1], None, pending[2])
    return ConvertedSNN(layers, time_steps, in_dims, out_scale=scale)
