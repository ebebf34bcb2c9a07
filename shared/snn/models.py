"""The model zoo: `csnn`, `mlp` and `resnet-mini`, all multi-step spiking networks.

Input coding (the model decides from the tensor's rank):
- direct coding, `x` of `[B, C, H, W]` in [0, 1]: the analog image is the input current of every
  time step. The layers before the first spiking neuron see the same input at each step, so they
  are computed once on `[B, ...]` and broadcast over T (exact, and T times cheaper).
- event frames, `x` of `[T, B, C, H, W]` in {0, 1}: passed through, one frame per step.

Between neurons, stateless layers (conv, BN, pooling, linear) run on the time-flattened batch
`[T*B, ...]`. The readout is non-spiking: the last linear layer's output is averaged over the T
steps (the mean membrane current of an integrator without threshold), giving logits `[B, classes]`.
Every forward starts from fresh neuron state. Synaptic layers are plain `nn.Conv2d`/`nn.Linear`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .neuron import IF, LIF
from .surrogate import SpikeFn


def model_layout(batch: Tensor) -> Tensor:
    """A batch of dataset samples in the models' input layout: images `[B, C, H, W]` pass
    through, event samples `[B, T, C, H, W]` become `[T, B, C, H, W]` (a view)."""
    return batch.transpose(0, 1) if batch.dim() == 5 else batch


def over_time(layer: Callable[[Tensor], Tensor], x_seq: Tensor) -> Tensor:
    """Apply a stateless layer to every step of `[T, B, ...]` as one batch of T*B."""
    return layer(x_seq.flatten(0, 1)).unflatten(0, x_seq.shape[:2])


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling, stride 2, of `[..., H, W]` (H and W even), as strided-slice sums.

    Several times faster than `F.avg_pool2d` on CPU for the NCHW spike maps here, forward and
    backward; the values are the same (a sum of 4 then * 0.25, the backward is exact)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        out = x[..., ::2, ::2] + x[..., 1::2, ::2]
        out += x[..., ::2, 1::2]
        out += x[..., 1::2, 1::2]
        return out.mul_(0.25)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        *lead, h, w = ctx.shape
        grad_in = grad.new_empty(*lead, h // 2, 2, w // 2, 2)
        quarter = grad * 0.25
        for i in (0, 1):
            for j in (0, 1):
                grad_in[..., i, :, j] = quarter
        return grad_in.view(ctx.shape)


class AvgPool2x2(nn.AvgPool2d):
    """`nn.AvgPool2d(2)` with a faster CPU path for even-sized inputs."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
            return _AvgPool2x2.apply(x)
        return super().forward(x)


class SpikingNet(nn.Module):
    """Base: `head` runs before the first neuron, `body` maps `[T, B, ...]` to outputs per step."""

    def __init__(self, time_steps: int, in_dims: int) -> None:
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        self.time_steps = time_steps
        self.in_dims = in_dims  # rank of one static sample batch, e.g. 4 for [B, C, H, W]

    def head(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def body(self, z_seq: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == self.in_dims:  # direct coding: the same current at each step
            z = self.head(x)
            z_seq = z.unsqueeze(0).expand(self.time_steps, *z.shape)
        elif x.dim() == self.in_dims + 1:  # event frames [T, B, ...]
            z_seq = over_time(self.head, x)
        else:
            raise ValueError(
                f"expected input of rank {self.in_dims} (direct coding) or "
                f"{self.in_dims + 1} ([T, B, ...] event frames), got shape {tuple(x.shape)}"
            )
        return self.body(z_seq).mean(0)


def _neuron(kind: str, surrogate: str | SpikeFn, **kwargs) -> LIF:
    if kind == "lif":
        return LIF(surrogate=surrogate, **kwargs)
    if kind == "if":
        return IF(surrogate=surrogate, **kwargs)
    raise ValueError(f"unknown neuron {kind!r}; choose 'lif' or 'if'")


class CSNN(SpikingNet):
    """conv3x3(in->16)-BN-spike-avgpool2, conv3x3(16->32)-BN-spike-avgpool2, linear -> classes."""

    def __init__(self, in_channels, num_classes, input_size, time_steps, neuron, surrogate, **kw):
        super().__init__(time_steps, in_dims=4)
        if input_size % 4:
            raise ValueError(f"csnn needs input_size divisible by 4, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.sn1 = _neuron(neuron, surrogate, **kw)
        self.pool1 = AvgPool2x2()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.sn2 = _neuron(neuron, surrogate, **kw)
        self.pool2 = AvgPool2x2()
        self.fc = nn.Linear(32 * (input_size // 4) ** 2, num_classes)

    def head(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))

    def body(self, z_seq: Tensor) -> Tensor:
        s = over_time(self.pool1, self.sn1(z_seq))
        s = over_time(self.pool2, self.sn2(over_time(lambda u: self.bn2(self.conv2(u)), s)))
        return over_time(self.fc, s.flatten(2))


class MLP(SpikingNet):
    """flatten, linear(in->hidden)-BN-spike, linear(hidden->classes)."""

    def __init__(self, in_channels, num_classes, input_size, time_steps, neuron, surrogate,
                 hidden=256, **kw):
        super().__init__(time_steps, in_dims=4)
        self.fc1 = nn.Linear(in_channels * input_size**2, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.sn1 = _neuron(neuron, surrogate, **kw)
        self.fc2 = nn.Linear(hidden, num_classes)

    def head(self, x: Tensor) -> Tensor:
        return self.bn1(self.fc1(x.flatten(1)))

    def body(self, z_seq: Tensor) -> Tensor:
        return over_time(self.fc2, self.sn1(z_seq))


class SpikingBlock(nn.Module):
    """Residual block on `[T, B, C, H, W]`: the shortcut is extra input current to the 2nd neuron.

    s1 = spike(BN(conv(x)));  out = spike(BN(conv(s1)) + shortcut(x))
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: str, surrogate, **kw):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.sn1 = _neuron(neuron, surrogate, **kw)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.sn2 = _neuron(neuron, surrogate, **kw)

    def forward(self, x_seq: Tensor) -> Tensor:
        s1 = self.sn1(over_time(lambda u: self.bn1(self.conv1(u)), x_seq))
        current = over_time(lambda u: self.bn2(self.conv2(u)), s1)
        return self.sn2(current + over_time(self.shortcut, x_seq))


class ResNetMini(SpikingNet):
    """stem conv3x3(in->16)-BN-spike, blocks 16 -> 32/2 -> 64/2, global avgpool, linear."""

    def __init__(self, in_channels, num_classes, input_size, time_steps, neuron, surrogate, **kw):
        super().__init__(time_steps, in_dims=4)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.sn1 = _neuron(neuron, surrogate, **kw)
        self.layer1 = SpikingBlock(16, 16, 1, neuron, surrogate, **kw)
        self.layer2 = SpikingBlock(16, 32, 2, neuron, surrogate, **kw)
        self.layer3 = SpikingBlock(32, 64, 2, neuron, surrogate, **kw)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def head(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))

    def body(self, z_seq: Tensor) -> Tensor:
        s = self.layer3(self.layer2(self.layer1(self.sn1(z_seq))))
        return over_time(self.fc, over_time(self.pool, s).flatten(2))


def federated_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a federation exchanges and checkpoints: parameters and BN running statistics.

    BatchNorm's `num_batches_tracked` counters are left out: they are local bookkeeping (unused
    with a fixed momentum) and integer counters must not be averaged.
    """
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_federated_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load `federated_state` tensors into `model`; any other missing or extra key is an error."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state does not fit the model: missing {missing}, unexpected {result.unexpected_keys}"
        )


MODELS: dict[str, type[SpikingNet]] = {"csnn": CSNN, "mlp": MLP, "resnet-mini": ResNetMini}


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    input_size: int,
    time_steps: int,
    neuron: str = "lif",
    surrogate: str | SpikeFn = "atan",
    **neuron_kwargs,
) -> SpikingNet:
    """Build a zoo model. `neuron_kwargs` (decay, threshold, reset, v_init, detach_reset) go to
    every spiking neuron; LIF's default decay is 1 - 2**-1 = 0.5."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return cls(in_channels, num_classes, input_size, time_steps, neuron, surrogate, **neuron_kwargs)
