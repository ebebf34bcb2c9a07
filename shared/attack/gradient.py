"""L-infinity gradient attacks on the time-averaged logits: FGSM and PGD.

    FGSM:  x_adv = clip(x + eps * sign(grad_x CE(f(x), y)))
    PGD:   x_0 = clip(x + U(-eps, eps));  x_{i+1} = clip(proj_eps(x_i + a * sign(grad_x CE)))

f is the victim in eval mode, CE the cross-entropy of its time-averaged logits, clip the valid
input range (pixels in [0, 1]) and proj_eps the projection onto the L-inf ball of radius eps
around x; a = eps / 4 and 10 steps by default. The spike derivative in the backward pass is the
attacker's chosen estimator (`shared.attack.estimators`); the victim is left as it was found.
The random start draws from torch's global generator, so `torch.manual_seed` repeats a run.

torchattacks implements the same two attacks but needs torchvision, which does not import
beside this project's CPU torch build; the loops are a few lines, so they live here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AttackError
from .estimators import gradient_estimator

Bounds = tuple[float, float]


@contextmanager
def attack_mode(model: nn.Module, grad: str) -> Iterator[nn.Module]:
    """The victim in eval mode back-propagating with estimator `grad`; both undone on exit."""
    was_training = model.training
    with gradient_estimator(model, grad):
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def check_eps(eps: float) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise AttackError(f"eps must be a number, got {eps!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise AttackError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def _check_batch(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise AttackError("x must be a floating-point tensor: images [B, C, H, W] or [T, B, ...]")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise AttackError("y must be an int64 tensor of class ids, shape [B]")
    batch = x.shape[1] if x.dim() == 5 else x.shape[0]
    if batch != len(y):
        raise AttackError(f"x holds {batch} samples but y holds {len(y)} labels")


def logits_with_grad(model: nn.Module, x: Tensor) -> Tensor:
    """The victim's logits on `x`, which must require grad; a clear error if not differentiable."""
    logits = model(x)
    if not logits.requires_grad:
        raise AttackError(
            f"{type(model).__name__}'s eval-mode forward is not differentiable (an integer or "
            "no-grad path, e.g. a quantized model); attack its float twin instead"
        )
    return logits


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """d CE(model(x), y) / dx, summed over the batch (so each sample gets its own gradient)."""
    x = x.detach().requires_grad_()
    loss = F.cross_entropy(logits_with_grad(model, x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    grad: str = "pdsg",
    bounds: Bounds = (0.0, 1.0),
) -> Tensor:
    """One signed-gradient step of size `eps` (L-inf), clamped to `bounds`; returns x_adv."""
    eps = check_eps(eps)
    _check_batch(x, y)
    x = x.detach()
    with attack_mode(model, grad):
        step = eps * loss_gradient(model, x, y).sign()
    return (x + step).clamp(*bounds)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    grad: str = "pdsg",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    bounds: Bounds = (0.0, 1.0),
) -> Tensor:
    """Projected gradient descent in the L-inf ball of radius `eps` around `x`; returns x_adv.

    `step_size` defaults to eps / 4; the random start is uniform in the ball (global generator).
    """
    eps = check_eps(eps)
    _check_batch(x, y)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AttackError(f"steps must be an integer >= 1, got {steps!r}")
    alpha = eps / 4 if step_size is None else check_eps(step_size)
    x = x.detach()
    lower, upper = (x - eps).clamp_min(bounds[0]), (x + eps).clamp_max(bounds[1])
    with attack_mode(model, grad):
        x_adv = x.clone()
        if random_start and eps > 0:
            x_adv += torch.empty_like(x).uniform_(-eps, eps)
        x_adv = torch.maximum(torch.minimum(x_adv, upper), lower)
        for _ in range(steps):
            x_adv = x_adv + alpha * loss_gradient(model, x_adv, y).sign()
            x_adv = torch.maximum(torch.minimum(x_adv, upper), lower)
    return x_adv
