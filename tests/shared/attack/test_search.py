"""shared.attack.search: the gradient-free square attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.attack import AttackError, pgd, square
from shared.attack.search import p_schedule, square_side


class NoGrad(nn.Module):
    """The victim behind a no-grad forward, like an integer engine: only its predictions."""

    def __init__(self, victim: nn.Module) -> None:
        super().__init__()
        self.victim = victim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.victim(x)


def test_square_stays_in_the_ball_and_fools_without_gradients(image_victim, digits_test):
    x, y = digits_test(40)
    with torch.no_grad():
        keep = image_victim(x).argmax(1) == y
    x, y = x[keep], y[keep]
    blind = NoGrad(image_victim).eval()
    with pytest.raises(AttackError, match="not differentiable"):
        pgd(blind, x, y, 0.3)
    torch.manual_seed(0)
    x_adv = square(blind, x, y, 0.3, queries=60)
    assert x_adv.shape == x.shape and 0 <= x_adv.min() and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    with torch.no_grad():
        fooled = (image_victim(x_adv).argmax(1) != y).float().mean()
    assert fooled > 0.8  # 0.3 is a large L-inf ball on digits: search alone fools most inputs
    torch.manual_seed(0)
    again = square(blind, x, y, 0.3, queries=60)
    assert torch.equal(again, x_adv)  # the global generator makes it repeatable


def test_zero_budget_changes_nothing_and_bad_arguments_are_refused(image_victim, digits_test):
    x, y = digits_test(4)
    assert torch.equal(square(image_victim, x, y, 0.0, queries=5), x)
    with pytest.raises(AttackError, match="queries"):
        square(image_victim, x, y, 0.1, queries=0)
    with pytest.raises(AttackError, match="images"):
        square(image_victim, x[None].expand(2, 4, 1, 8, 8).contiguous(), y, 0.1)


def test_schedule_shrinks_the_square():
    sides = [square_side(p_schedule(q, 1000, 0.3), 28, 28) for q in (1, 10, 100, 500, 999)]
    assert sides == sorted(sides, reverse=True) and sides[0] == 15 and sides[-1] >= 1
    assert square_side(1.0, 8, 8) == 7  # never the whole image: the position stays random
