"""Gradient estimators for attacking a spiking net whose training surrogate is unknown.

The spike is a Heaviside step of the membrane potential u, so the attacker must pick a
pseudo-derivative for the backward pass. The fixed surrogates of `shared.snn.SURROGATES` are one
choice each; PDSG (potential-dependent surrogate gradient, Lun et al., CVPR 2025) fits the
derivative to the membrane potentials the victim actually produces:

    g(u) = exp(-(u - theta - sigma/2)^2 / (2 sigma^2)) / (sqrt(2 pi) sigma)

a Gaussian of unit area centred half a standard deviation above the threshold theta, where sigma
is the standard deviation of the membrane potentials seen so far at that layer: for step t the
potentials of steps 1..t of the current forward, over the batch and, for conv layers, the
spatial positions, separately per channel (per feature for linear layers). sigma = 0 (below
1e-6 in float) is mapped to 1. A wide spread of potentials gives a wide, low derivative and a
concentrated one a sharp, high derivative, without knowing how the victim was trained.

`gradient_estimator(model, name)` swaps the estimator into every spiking neuron for the
duration of a `with` block and restores the victim's own surrogates afterwards, also when the
block raises. Only the backward pass changes: the neurons' forward is the exact step whatever the
surrogate, so outputs stay bit-identical. PDSG plugs into the fused multi-step neuron
(`shared.snn.neuron`) like any registry surrogate: that neuron's backward hands the surrogate
`h - theta` for all T steps at once, `[T, B, C, ...]`, which is exactly the potential history
the statistics need, so the normal path pays nothing and nothing extra is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from shared.snn import SURROGATES, Surrogate, spiking_neurons

from .errors import AttackError

SIGMA_FLOOR = 1e-6  # a float std below this is a zero spread: sigma = 1


class PDSG(Surrogate):
    """Potential-dependent Gaussian pseudo-derivative; `alpha` is unused (kept at 1).

    `grad_(x)` takes `x = h - theta` in the neuron layout `[T, B, C, ...]` (conv) or
    `[T, B, F]` (linear): dim 0 time, dim 1 batch, dim 2 channel / feature.
    """

    name = "pdsg"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    @staticmethod
    def sigma(x: Tensor) -> Tensor:
        """`[T, 1, C, 1, ...]` std of x over steps 1..t, the batch and the spatial positions."""
        if x.dim() < 3:
            raise AttackError(
                f"PDSG needs membrane potentials [T, B, C, ...] (got shape {tuple(x.shape)})"
            )
        reduce = [1, *range(3, x.dim())]
        xd = x.to(torch.float64)
        count = math.prod(x.shape[d] for d in reduce)
        # per step sums over batch and space, then running sums over time: mean and variance of
        # all values seen up to each step, in float64 so that the difference of squares is exact
        # enough for potentials of any scale
        s1 = xd.sum(reduce, keepdim=True).cumsum(0)
        s2 = xd.square().sum(reduce, keepdim=True).cumsum(0)
        n = count * torch.arange(1, x.shape[0] + 1, dtype=torch.float64).view(
            -1, *([1] * (x.dim() - 1))
        )
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min_(0)
        sigma = var.sqrt()
        scale = mean.abs().clamp_min(1.0)
        sigma = torch.where(sigma > SIGMA_FLOOR * scale, sigma, torch.ones_like(sigma))
        return sigma.to(x.dtype)

    def grad_(self, x: Tensor) -> Tensor:
        return pdsg_derivative_(x, self.sigma(x))


def pdsg_derivative_(x: Tensor, sigma: Tensor) -> Tensor:
    """PDSG's g at `x = u - theta` for a given sigma (broadcast against x); overwrites x."""
    z = x.sub_(sigma / 2).div_(sigma)
    return z.square_().mul_(-0.5).exp_().div_(sigma * math.sqrt(2 * math.pi))


ESTIMATORS: tuple[str, ...] = ("pdsg", *SURROGATES)


def get_estimator(name: str) -> Surrogate:
    """The gradient estimator called `name`: "pdsg" or a `shared.snn.SURROGATES` name."""
    if name == "pdsg":
        return PDSG()
    if isinstance(name, str) and name in SURROGATES:
        return SURROGATES[name]()
    known = ", ".join(ESTIMATORS)
    raise AttackError(f"unknown gradient estimator {name!r}; choose one of: {known}")


@contextmanager
def gradient_estimator(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Within the block, every spiking neuron of `model` back-propagates with estimator `name`.

    The victim's own surrogates are put back on exit, whatever happens in the block.
    """
    estimator = get_estimator(name)
    neurons = [m for _, m in spiking_neurons(model)]
    if not neurons:
        raise AttackError(f"{type(model).__name__} has no spiking neurons to attack through")
    saved = [n.surrogate for n in neurons]
    try:
        for neuron in neurons:
            neuron.surrogate = estimator
        yield model
    finally:
        for neuron, surrogate in zip(neurons, saved, strict=True):
            neuron.surrogate = surrogate
