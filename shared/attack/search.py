"""A gradient-free L-infinity attack: random search over square patches (after the Square
Attack, Andriushchenko et al., ECCV 2020), written for this project.

It only queries the model's predictions, so it attacks the deployed model itself (the integer
path of a quantized model) and cannot be fooled by a gradient that is masked, flat or wrong.
If it beats the gradient attacks by more than a few points, their low success says more about
the gradient than about the model (Carlini et al. 2019, "On Evaluating Adversarial Robustness").

    delta_0 = eps * s,  s in {-1, +1} per channel and column (vertical stripes)
    each query: a random square of side h, new signs per channel inside it, kept when the margin
                m(x) = z_y(x) - max_{k != y} z_k(x) of the time-averaged logits z drops
    h = round(sqrt(p * H * W)), p halved at fixed shares of the query budget (p_init at start)

Every candidate is clipped to the valid range and stays on the surface of the eps-ball, so the
attack spends its whole budget. An input leaves the search as soon as it is misclassified.
Randomness comes from torch's global generator (`torch.manual_seed` repeats a run).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shared.snn import model_layout

from .errors import AttackError
from .gradient import Bounds, _check_batch, check_eps

# shares of the query budget at which p halves (the schedule of the Square Attack paper,
# given there for 10,000 queries)
HALVINGS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{k != y} z_k per sample (negative: misclassified)."""
    logits = model(model_layout(x)).double()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def square_side(p: float, height: int, width: int) -> int:
    """Side of the square that covers a share `p` of an H x W image (1 .. min(H, W) - 1)."""
    side = int(round(math.sqrt(p * height * width)))
    return max(1, min(side, min(height, width) - 1 if min(height, width) > 1 else 1))


def p_schedule(query: int, queries: int, p_init: float) -> float:
    """The share of pixels a square covers at `query` of `queries`."""
    return p_init / 2 ** sum(query > share * queries for share in HALVINGS)


@torch.no_grad()
def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    queries: int = 500,
    p_init: float = 0.3,
    bounds: Bounds = (0.0, 1.0),
) -> Tensor:
    """Random-search L-inf attack on images `x` `[B, C, H, W]` with labels `y`; returns x_adv
    (each within eps of x, clipped to `bounds`). `queries` counts forward passes per input
    (the first one scores the stripe start); the model is queried in eval mode, never
    differentiated."""
    eps = check_eps(eps)
    _check_batch(x, y)
    if x.dim() != 4:
        raise AttackError(f"square takes images [B, C, H, W], got shape {tuple(x.shape)}")
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise AttackError(f"queries must be an integer >= 1, got {queries!r}")
    if not 0 < p_init <= 1:
        raise AttackError(f"p_init must lie in (0, 1], got {p_init!r}")
    was_training = model.training
    model.eval()
    try:
        return _search(model, x.detach(), y, eps, queries, p_init, bounds)
    finally:
        model.train(was_training)


def _search(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int, p_init: float,
            bounds: Bounds) -> Tensor:
    b, c, h, w = x.shape
    lo, hi = bounds
    stripes = torch.randint(0, 2, (b, c, 1, w), dtype=x.dtype) * 2 - 1
    x_adv = (x + eps * stripes).clamp(lo, hi)
    if eps == 0:
        return x_adv
    margin = _margin(model, x_adv, y)
    for query in range(1, queries):
        active = (margin > 0).nonzero().flatten()
        if len(active) == 0:
            break
        side = square_side(p_schedule(query, queries, p_init), h, w)
        top = torch.randint(0, h - side + 1, (len(active),))
        left = torch.randint(0, w - side + 1, (len(active),))
        rows = (torch.arange(h)[None, :] >= top[:, None]) & (torch.arange(h)[None, :]
                                                           < (top + side)[:, None])
        cols = (torch.arange(w)[None, :] >= left[:, None]) & (torch.arange(w)[None, :]
                                                            < (left + side)[:, None])
        window = (rows[:, :, None] & cols[:, None, :])[:, None]  # [A, 1, H, W]
        signs = (torch.randint(0, 2, (len(active), c, 1, 1), dtype=x.dtype) * 2 - 1) * eps
        xa = x[active]
        delta = torch.where(window, signs, x_adv[active] - xa)
        candidate = (xa + delta).clamp(lo, hi)
        new_margin = _margin(model, candidate, y[active])
        better = new_margin < margin[active]
        keep = active[better]
        x_adv[keep] = candidate[better]
        margin[keep] = new_margin[better]
    return x_adv
