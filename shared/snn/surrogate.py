"""Surrogate gradients for the spike nonlinearity.

A neuron fires when its membrane potential reaches the threshold:

    s = H(x),  x = v - threshold,  H(x) = 1 if x >= 0 else 0

The true derivative of H is a Dirac delta, useless for gradient descent. Training keeps the exact
Heaviside forward and replaces dH/dx in the backward pass by a smooth pseudo-derivative g(x)
(Neftci et al. 2019). Every g below integrates to 1 over the real line.

    atan       g(x) = (a/2) / (1 + (pi/2 * a * x)^2)              a = 2
    sigmoid    g(x) = a * sig(a x) * (1 - sig(a x))               a = 4
    triangle   g(x) = max(0, 1 - |x| / w) / w                     w = 1
    rectangle  g(x) = 1/w if |x| < w/2 else 0                     w = 1

A surrogate is a callable `fn(v_minus_threshold) -> spikes` with a custom backward, so any
`torch.autograd.Function`-style callable with that signature can stand in for a registry entry.
Registry entries additionally expose `grad(x)`, which lets the multi-step neuron fuse the whole
time loop into one autograd node (see `shared.snn.neuron`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SpikeFn = Callable[[Tensor], Tensor]


class _Heaviside(torch.autograd.Function):
    """Exact Heaviside forward; the surrogate's pseudo-derivative backward."""

    @staticmethod
    def forward(ctx, x: Tensor, surrogate: Surrogate) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spikes: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_spikes * ctx.surrogate.grad(x), None


class Surrogate:
    """A named pseudo-derivative of the Heaviside step, with width/steepness `alpha`.

    Subclasses implement `grad_(x)`, which may overwrite `x` (the neuron's backward hands it a
    scratch tensor, saving allocations on the hot path); `grad(x)` is the non-destructive form.
    """

    name = "surrogate"

    def __init__(self, alpha: float) -> None:
        if not alpha > 0:
            raise ValueError(f"surrogate {self.name}: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def grad_(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def grad(self, x: Tensor) -> Tensor:
        return self.grad_(x.clone())

    def grad_mul_(self, x: Tensor, grad: Tensor) -> Tensor:
        """`grad * g(x)`, computed in x's memory (subclasses may fuse the two)."""
        return self.grad_(x).mul_(grad)

    def __call__(self, x: Tensor) -> Tensor:
        return _Heaviside.apply(x, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


class ATan(Surrogate):
    name = "atan"

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__(alpha)

    def grad_(self, x: Tensor) -> Tensor:
        # (a/2) / (1 + (c x)^2) with c = pi a / 2, as 1 / (2/a + (2 c^2 / a) x^2)
        a = self.alpha
        c = math.pi / 2 * a
        return x.square_().mul_(2 * c * c / a).add_(2 / a).reciprocal_()

    def grad_mul_(self, x: Tensor, grad: Tensor) -> Tensor:
        # grad / (2/a + (2 c^2 / a) x^2): two passes (addcmul, div) instead of five
        a = self.alpha
        c = math.pi / 2 * a
        den = torch.addcmul(x.new_full((), 2 / a), x, x, value=2 * c * c / a, out=x)
        return torch.div(grad, den, out=den)


class Sigmoid(Surrogate):
    name = "sigmoid"

    def __init__(self, alpha: float = 4.0) -> None:
        super().__init__(alpha)

    def grad_(self, x: Tensor) -> Tensor:
        sig = x.mul_(self.alpha).sigmoid_()
        return sig.mul_(1 - sig).mul_(self.alpha)


class Triangle(Surrogate):
    name = "triangle"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def grad_(self, x: Tensor) -> Tensor:
        w = self.alpha
        return x.abs_().mul_(-1 / w).add_(1).clamp_min_(0).div_(w)


class Rectangle(Surrogate):
    name = "rectangle"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def grad_(self, x: Tensor) -> Tensor:
        w = self.alpha
        return x.abs_().lt_(w / 2).div_(w)


SURROGATES: dict[str, type[Surrogate]] = {
    cls.name: cls for cls in (ATan, Sigmoid, Triangle, Rectangle)
}


def get_surrogate(surrogate: str | SpikeFn) -> SpikeFn:
    """Resolve a registry name (default parameters) or pass a callable through unchanged."""
    if isinstance(surrogate, str):
        try:
            return SURROGATES[surrogate]()
        except KeyError:
            known = ", ".join(SURROGATES)
            raise ValueError(f"unknown surrogate {surrogate!r}; choose one of: {known}") from None
    if not callable(surrogate):
        raise TypeError(f"surrogate must be a name or a callable, got {type(surrogate).__name__}")
    return surrogate
