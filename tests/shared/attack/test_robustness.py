"""shared.attack.robustness: budgets, the worst case per input, and the checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.attack import LinfPlan, default_budgets, linf_robustness, with_budgets
from shared.attack.robustness import Outcome, Robustness, linf_checks, sparse_robustness


def test_budgets_follow_the_dataset():
    mnist = default_budgets("mnist-subset")
    assert mnist.threat == "linf" and mnist.standard == 0.3 and max(mnist.values) == 0.3
    assert default_budgets("cifar10").standard == pytest.approx(8 / 255)
    events = default_budgets("dvs-digits")
    assert events.threat == "l0" and events.standard == 0.0025 and events.large is None
    moved = with_budgets(mnist, (0.1,), 8 / 255)
    assert moved.values == (8 / 255, 0.1) and moved.standard == 8 / 255  # curve holds headline
    assert with_budgets(mnist, ()).values == (0.3,)


def _fooled(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def _result(outcomes: list[Outcome]) -> Robustness:
    budgets = with_budgets(default_budgets("digits"), (0.1, 0.3))
    return Robustness(budgets, attempted=5, correct=4, outcomes=outcomes)


def test_robust_accuracy_is_the_worst_case_per_input():
    result = _result([Outcome("pgd-atan", 0.3, _fooled(1, 1, 0, 0)),
                      Outcome("square", 0.3, _fooled(0, 0, 1, 0))])
    summary = result.summary()
    # 4 of 5 inputs correct, 3 of them fooled by some attack: 1 of 5 robust
    assert summary["robust_accuracy"] == pytest.approx(1 / 5)
    assert summary["worst_attack"] == "pgd-atan" and summary["budget"] == 0.3
    rows = {r["name"]: r for r in result.rows()}
    assert rows["pgd-atan"]["robust_accuracy"] == pytest.approx(2 / 5)
    assert summary["robust_accuracy"] <= min(r["robust_accuracy"] for r in rows.values())


def test_checks_warn_on_gradient_masking_and_weak_pgd():
    plan = LinfPlan(with_budgets(default_budgets("digits"), (0.1, 0.3)),
                    ("pgd-atan", "fgsm-atan", "square"))
    masked = _result([Outcome("pgd-atan", 0.1, _fooled(0, 0, 0, 0)),
                      Outcome("fgsm-atan", 0.1, _fooled(1, 0, 0, 0)),
                      Outcome("square", 0.1, _fooled(1, 1, 1, 0)),
                      Outcome("pgd-atan", 0.3, _fooled(0, 0, 0, 0)),
                      Outcome("fgsm-atan", 0.3, _fooled(0, 0, 0, 0)),
                      Outcome("square", 0.3, _fooled(1, 0, 0, 0))])
    checks = linf_checks(masked, plan)
    assert checks["gradient_free"]["status"] == "warn"
    assert "gradient masking likely" in checks["gradient_free"]["detail"]
    assert checks["gradient_free"]["figure"] == pytest.approx(0.5)  # 3/4 vs 1/4 at 0.1
    assert checks["pgd_vs_fgsm"]["status"] == "warn"
    assert checks["success_rises"]["status"] == "warn"  # 3/4 at 0.1, 1/4 at 0.3
    sound = _result([Outcome("pgd-atan", 0.1, _fooled(1, 1, 0, 0)),
                     Outcome("fgsm-atan", 0.1, _fooled(1, 0, 0, 0)),
                     Outcome("square", 0.1, _fooled(0, 1, 0, 0)),
                     Outcome("pgd-atan", 0.3, _fooled(1, 1, 1, 1)),
                     Outcome("fgsm-atan", 0.3, _fooled(1, 1, 1, 0)),
                     Outcome("square", 0.3, _fooled(1, 1, 1, 0))])
    assert {c["status"] for c in linf_checks(sound, plan).values()} == {"pass"}


def test_sparse_robustness_counts_a_success_only_within_the_budget():
    budgets = default_budgets("dvs-digits")  # 0.1 % .. 1 % of entries
    result = sparse_robustness({"sda": ([10, 50, 500], [True, True, False])}, 4, 10_000,
                               budgets)
    curve = {c["budget"]: c["robust_accuracy"] for c in result.curve()}
    assert curve[0.001] == pytest.approx(2 / 4) and curve[0.005] == pytest.approx(1 / 4)
    assert result.checks["success_rises"]["status"] == "pass"
    assert result.checks["large_budget"]["status"] == "warn"  # 2 of 3 without a budget


class Masked(nn.Module):
    """The victim behind a zero-gradient input rounding: gradient attacks go blind, the model
    is as weak as before (gradient masking by construction)."""

    def __init__(self, victim: nn.Module) -> None:
        super().__init__()
        self.victim = victim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(torch.round(x * 16) / 16)  # d round / dx = 0


def test_a_masked_model_gets_the_gradient_masking_warning(image_victim, digits_test):
    x, y = digits_test(40)
    masked = Masked(image_victim).eval()
    with torch.no_grad():
        keep = masked(x).argmax(1) == y
    plan = LinfPlan(with_budgets(default_budgets("digits"), ()), ("pgd-atan", "fgsm-atan",
                    "square"), restarts=1, queries=40, checks=False)
    result = linf_robustness(masked, masked, x[keep], y[keep], len(y), plan)
    check = result.checks["gradient_free"]
    assert check["status"] == "warn" and "gradient masking likely" in check["detail"]
    assert result.summary()["worst_attack"] == "square"
