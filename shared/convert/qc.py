"""Phase 1 of dual-phase conversion: the clip-and-quantize (QC) activation and the ReLU ANN zoo.

An ANN trained with the QC activation with L = T levels computes exactly what an IF neuron
(threshold theta, reset by subtraction, initial potential theta/2) fires in T steps of a constant
input current z, so its clipping and quantization errors are gone before conversion:

    QC_L(z) = theta * clip(floor(z * L / theta + 1/2) / L, 0, 1)
    IF:  N = #spikes in T steps,  theta * N / T == QC_T(z)  for every z (exactly)

Rounding is half-up, floor(u + 1/2): it equals round(u) except at ties, which go up as the IF
neuron's `h >= theta` firing does. In training each element skips rounding with probability
`p` (noisy rounding, default 0.1), rounding passes the gradient straight through, and theta is a
learnable per-layer scalar (`param_groups` puts it in its own group without weight decay).

`build_ann` gives the ReLU twins of the SNN zoo (`csnn`, `mlp`, `resnet-mini`): the same
topology with ReLU instead of spikes, as `nn.Sequential`s that `to_qc_ann` and
`shared.convert.dual_phase_convert` understand. `csnn` is the reference CNN of METHODS.md 1.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from shared.quant.fake import QConv2d, QLinear

THETA_INIT = 4.0  # the paper starts theta at ~4-5 (BN-normalised pre-activations)
NOISE_P = 0.1  # training: probability that an element skips rounding


class ConvertError(ValueError):
    """A model or setting that cannot be converted (one-line message naming the layer)."""


def check_time_steps(time_steps: int) -> int:
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ConvertError(f"time_steps must be an integer >= 1, got {time_steps!r}")
    return time_steps


def round_half_up(u: Tensor) -> Tensor:
    """floor(u + 1/2): round to nearest, ties up (the IF neuron's `>=` threshold)."""
    return torch.floor(u + 0.5)


def qc(z: Tensor, theta: Tensor | float, levels: int) -> Tensor:
    """QC_L(z) = theta * clip(floor(z L / theta + 1/2) / L, 0, 1), no gradient tricks."""
    return theta * torch.clamp(round_half_up(z * levels / theta) / levels, 0.0, 1.0)


class QCActivation(nn.Module):
    """The clip-and-quantize activation with a learnable threshold `theta` (a scalar Parameter).

    Training mode: straight-through rounding, and each element skips rounding with probability
    `noise_p`. Eval mode: exactly `qc(z, theta, levels)`.
    """

    def __init__(self, levels: int, theta: float = THETA_INIT, noise_p: float = NOISE_P) -> None:
        super().__init__()
        self.levels = check_time_steps(levels)
        if not 0.0 <= noise_p < 1.0:
            raise ConvertError(f"noise_p must be in [0, 1), got {noise_p}")
        self.noise_p = float(noise_p)
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, z: Tensor) -> Tensor:
        u = z * self.levels / self.theta
        rounded = round_half_up(u)
        if self.training and self.noise_p > 0:
            keep = torch.rand_like(u) < self.noise_p  # these elements are not rounded
            rounded = torch.where(keep, u, rounded)
        u = u + (rounded - u).detach()  # straight-through rounding gradient
        return self.theta * torch.clamp(u / self.levels, 0.0, 1.0)

    def extra_repr(self) -> str:
        theta = float(self.theta.detach())
        return f"levels={self.levels}, theta={theta:.4g}, noise_p={self.noise_p}"


class ResidualBlock(nn.Module):
    """act2(BN(conv(act1(BN(conv(x))))) + shortcut(x)), the ANN twin of `SpikingBlock`."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, conv: Callable[..., nn.Conv2d] = nn.Conv2d
    ) -> None:
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1: nn.Module = nn.ReLU()
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                conv(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act2: nn.Module = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + self.shortcut(x))


def _synapses(bits: int) -> tuple[Callable[..., nn.Conv2d], Callable[..., nn.Linear]]:
    """Factories of plain float layers, or of the fake-quantized `shared.quant` ones with
    `bits`-bit weights."""
    if bits == 32:
        return nn.Conv2d, nn.Linear

    def conv(*args, **kwargs) -> nn.Conv2d:
        layer = QConv2d(*args, **kwargs)
        layer.bits = bits
        return layer

    def linear(*args, **kwargs) -> nn.Linear:
        layer = QLinear(*args, **kwargs)
        layer.bits = bits
        return layer

    return conv, linear


def build_ann(
    name: str, *, in_channels: int, num_classes: int, input_size: int, weight_bits: int = 32
) -> nn.Sequential:
    """The ReLU twin of a zoo SNN (`shared.snn.build_model`'s names and layer sizes).

    `weight_bits` < 32 makes the synaptic layers fake-quantized (`shared.quant`: symmetric
    narrow-range codes with a power-of-two scale per output channel, straight-through)."""
    conv, linear = _synapses(weight_bits)
    if name == "csnn":
        if input_size % 4:
            raise ConvertError(f"csnn needs input_size divisible by 4, got {input_size}")
        layers = [
            ("conv1", conv(in_channels, 16, 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(16)),
            ("act1", nn.ReLU()),
            ("pool1", nn.AvgPool2d(2)),
            ("conv2", conv(16, 32, 3, padding=1, bias=False)),
            ("bn2", nn.BatchNorm2d(32)),
            ("act2", nn.ReLU()),
            ("pool2", nn.AvgPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc", linear(32 * (input_size // 4) ** 2, num_classes)),
        ]
    elif name == "mlp":
        layers = [
            ("flatten", nn.Flatten()),
            ("fc1", linear(in_channels * input_size**2, 256, bias=False)),
            ("bn1", nn.BatchNorm1d(256)),
            ("act1", nn.ReLU()),
            ("fc2", linear(256, num_classes)),
        ]
    elif name == "resnet-mini":
        layers = [
            ("conv1", conv(in_channels, 16, 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(16)),
            ("act1", nn.ReLU()),
            ("layer1", ResidualBlock(16, 16, 1, conv)),
            ("layer2", ResidualBlock(16, 32, 2, conv)),
            ("layer3", ResidualBlock(32, 64, 2, conv)),
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", linear(64, num_classes)),
        ]
    else:
        raise ConvertError(f"unknown model {name!r}; choose one of: csnn, mlp, resnet-mini")
    return nn.Sequential(OrderedDict(layers))


# Layers conversion understands (ReLU only before `to_qc_ann`, QCActivation only after).
STATELESS = (nn.Flatten, nn.Dropout, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
SYNAPSES = (nn.Conv2d, nn.Linear)
SUPPORTED = "Conv2d, Linear, BatchNorm1d/2d, ReLU, AvgPool2d, AdaptiveAvgPool2d, Flatten, " \
    "Dropout, Identity, Sequential, shared.convert.ResidualBlock"


def leaf_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) in forward order, looking inside `nn.Sequential`s; a `ResidualBlock` is one
    layer. Raises `ConvertError` naming the first layer conversion does not support."""
    if not isinstance(model, nn.Sequential):
        raise ConvertError(
            f"model {type(model).__name__} is not an nn.Sequential of supported layers "
            f"({SUPPORTED}); build it with shared.convert.build_ann or as an nn.Sequential"
        )
    for child_name, layer in model.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(layer, nn.Sequential):
            yield from leaf_layers(layer, f"{name}.")
        elif isinstance(layer, (ResidualBlock, nn.ReLU, QCActivation, *STATELESS, *NORMS,
                                *SYNAPSES)):
            if isinstance(layer, nn.AvgPool2d) and layer.padding not in (0, (0, 0)):
                raise ConvertError(f"layer '{name}' (AvgPool2d with padding) is not supported")
            yield name, layer
        else:
            raise ConvertError(
                f"layer '{name}' ({type(layer).__name__}) cannot be converted to an SNN; "
                f"supported layers: {SUPPORTED}"
            )


def _replace_relus(module: nn.Module, time_steps: int, theta: float, noise_p: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, QCActivation(time_steps, theta, noise_p))
        else:
            _replace_relus(child, time_steps, theta, noise_p)


def to_qc_ann(
    relu_ann: nn.Module, time_steps: int, *, theta: float = THETA_INIT, noise_p: float = NOISE_P
) -> nn.Sequential:
    """A copy of `relu_ann` whose ReLUs are `QCActivation(levels=time_steps)` (phase 1).

    Weights are copied; `relu_ann` is untouched. Fine-tune the result (with `param_groups`) at
    the T the SNN will run at. Unsupported layers are refused here, by name.
    """
    check_time_steps(time_steps)
    list(leaf_layers(relu_ann))  # validate before copying
    qc_ann = copy.deepcopy(relu_ann)
    _replace_relus(qc_ann, time_steps, theta, noise_p)
    return qc_ann


def qc_activations(model: nn.Module) -> list[tuple[str, QCActivation]]:
    """The (name, module) pairs of every QC activation in `model`, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QCActivation)]


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: the weights (with `weight_decay`) and every QC threshold theta
    in a group of its own without weight decay (decay would pull theta, the clipping range,
    towards 0). A model without QC activations gives one group."""
    thetas = [m.theta for _, m in qc_activations(model)]
    ids = {id(t) for t in thetas}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if thetas:
        groups.append({"params": thetas, "weight_decay": 0.0})
    return groups
