"""Robust accuracy a reviewer can trust: the dataset's standard budgets, the worst case per input
over every attack, and sanity checks against gradient masking (Carlini et al. 2019, "On
Evaluating Adversarial Robustness"; AutoAttack's worst case over several attacks).

    robust accuracy(b) = #{inputs classified correctly AND fooled by no attack within budget b}
                         / #{inputs attempted}

Budgets (`default_budgets`): MNIST-like grey-scale images a curve of L-inf radii up to 0.3, the
headline at 0.3 (the MNIST challenge's radius); natural colour images the 8/255 family, headline
8/255; binary event frames L0 budgets as a share of a sample's entries (flipped events), headline
0.25 % (the SDA paper's 800 of 327,680 entries). Every attack runs on the same inputs (the first
correctly classified ones); gradient attacks take their gradients from a differentiable view and
every adversarial example is judged on the deployed model.

The checks (`pass` or `warn`, each with its figure):
- `success_rises`: worst-case success does not fall as the budget grows;
- `large_budget`: at a large budget (L-inf 0.5: every image can reach the same mid-grey image;
  events: no budget) the attacks fool ~all inputs (>= 99 %);
- `pgd_vs_fgsm`: PGD fools at least as many inputs as FGSM with the same estimator;
- `more_iterations`: 5x the steps and 2x the restarts do not raise robust accuracy;
- `gradient_free`: the random-search attack beats the gradient attacks by at most a few points,
  else "gradient masking likely";
- `transfer`: PGD on the float twin, judged on the deployed model, beats the white-box gradient
  attacks by at most a few points, else the deployed model's gradients are masked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from shared.snn import predict

from .errors import AttackError
from .gradient import fgsm, pgd
from .search import square

LINF, L0 = "linf", "l0"
LARGE_LINF = 0.5  # every image in [0, 1] is within 0.5 of mid-grey: no classifier is safe there
FEW_POINTS = 0.03  # "a few points" of success rate
ALL = 0.99  # "~100 %"


@dataclass(frozen=True)
class Budgets:
    """The budgets of a threat model: `values` the curve (ascending), `standard` the headline
    (one of `values`), `large` the budget at which attacks must succeed on ~all inputs (None:
    no budget). L-inf radii on inputs in [0, 1], or L0 as a share (0..1) of a sample's entries."""

    threat: str
    values: tuple[float, ...]
    standard: float
    large: float | None

    def label(self, value: float | None) -> str:
        return budget_label(self.threat, value)


def budget_label(threat: str, value: float | None) -> str:
    """`0.3`, `8/255` or `0.25 %` (L0 share); `none` for no budget."""
    if value is None:
        return "none"
    if threat == L0:
        return f"{100 * value:g} %"
    code = value * 255
    if abs(code - round(code)) < 1e-6 and value not in (0.1, 0.2, 0.3, 0.4, 0.5):
        return f"{round(code)}/255"
    return f"{value:g}"


def default_budgets(dataset: str) -> Budgets:
    """The budgets of `dataset` (a `shared.data` name): see the module docstring."""
    from shared.data import dataset_info

    info = dataset_info(dataset)
    if info.time_steps is not None:
        return Budgets(L0, (0.001, 0.0025, 0.005, 0.01), 0.0025, None)
    if info.in_channels == 3:
        return Budgets(LINF, (2 / 255, 4 / 255, 8 / 255, 16 / 255), 8 / 255, LARGE_LINF)
    return Budgets(LINF, (0.05, 0.1, 0.2, 0.3), 0.3, LARGE_LINF)


def with_budgets(budgets: Budgets, values: Sequence[float] | None = None,
                 standard: float | None = None) -> Budgets:
    """`budgets` with another curve (empty: the headline only) and / or headline; the curve
    always holds the headline."""
    standard = budgets.standard if standard is None else float(standard)
    curve = budgets.values if values is None else tuple(float(v) for v in values)
    return Budgets(budgets.threat, tuple(sorted({*curve, standard})), standard, budgets.large)


@dataclass
class Outcome:
    """One attack at one budget on the attacked inputs: `fooled[i]` whether the deployed model
    misclassifies input i's adversarial example (or, for sparse attacks, whether it was fooled
    within the budget)."""

    name: str
    budget: float
    fooled: Tensor  # bool [n]
    steps: int | None = None
    restarts: int | None = None
    queries: int | None = None
    role: str = "attack"  # or a check's own run: "strong", "large", "transfer", "unbudgeted"

    @property
    def extra(self) -> bool:
        return self.role != "attack"

    @property
    def success_rate(self) -> float:
        return float(self.fooled.float().mean()) if len(self.fooled) else 0.0


@dataclass
class Robustness:
    """Every outcome, the worst case per budget and the checks; `attempted` inputs, of which
    `correct` were classified correctly (and attacked)."""

    budgets: Budgets
    attempted: int
    correct: int
    outcomes: list[Outcome] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def robust_accuracy(self, fooled: Tensor) -> float:
        return (self.correct - int(fooled.sum())) / self.attempted if self.attempted else 0.0

    def at(self, budget: float, *, extra: bool = True) -> list[Outcome]:
        return [o for o in self.outcomes if o.budget == budget and (extra or not o.extra)]

    def worst(self, budget: float) -> Tensor:
        """Per input: fooled by any attack run at `budget`."""
        fooled = torch.zeros(self.correct, dtype=torch.bool)
        for outcome in self.at(budget):
            fooled |= outcome.fooled
        return fooled

    def worst_attack(self, budget: float) -> str | None:
        """The single attack that fools the most inputs at `budget` (None if none fools any)."""
        best = max(self.at(budget), key=lambda o: int(o.fooled.sum()), default=None)
        return best.name if best is not None and bool(best.fooled.any()) else None

    def curve(self) -> list[dict[str, Any]]:
        budgets = sorted({o.budget for o in self.outcomes}, key=_budget_key)
        rows = []
        for b in budgets:
            worst = self.worst(b)
            rows.append({"budget": b, "label": self.budgets.label(b),
                         "robust_accuracy": self.robust_accuracy(worst),
                         "success_rate": float(worst.float().mean()) if self.correct else 0.0,
                         "worst_attack": self.worst_attack(b),
                         "headline": b == self.budgets.standard})
        return rows

    def summary(self) -> dict[str, Any]:
        """The `robustness` object of `spikefed-evaluate --json`."""
        standard = self.budgets.standard
        worst = self.worst(standard)
        return {
            "threat": self.budgets.threat, "budget": standard,
            "budget_label": self.budgets.label(standard),
            "robust_accuracy": self.robust_accuracy(worst) if self.at(standard) else None,
            "clean_accuracy": self.correct / self.attempted if self.attempted else 0.0,
            "worst_attack": self.worst_attack(standard),
            "attacks": list(dict.fromkeys(o.name for o in self.outcomes)),
            "samples": self.attempted, "correct": self.correct,
            "curve": self.curve(), "checks": self.checks, "notes": self.notes,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per attack and budget (dense attacks), as in `spikefed-evaluate --json`."""
        return [{"name": o.name, "eps": o.budget, "success_rate": o.success_rate,
                 "robust_accuracy": self.robust_accuracy(o.fooled), "mean_l0": None,
                 "median_l0": None, "samples": self.correct, "attempted": self.attempted,
                 "steps": o.steps, "restarts": o.restarts, "queries": o.queries,
                 "role": o.role}
                for o in self.outcomes]


def _budget_key(b: float | None) -> float:
    return float("inf") if b is None else b


def judge_fooled(judge: nn.Module, x_adv: Tensor, y: Tensor, batch_size: int = 500) -> Tensor:
    """Per sample (dataset layout): whether the deployed model `judge` misclassifies it."""
    return predict(judge, x_adv, batch_size) != y


@dataclass(frozen=True)
class LinfPlan:
    """What `linf_robustness` runs. `attacks`: `pgd-<estimator>`, `fgsm-<estimator>`, `square`;
    `checks`: also run the checks' own attacks (large budget, strong PGD, transfer)."""

    budgets: Budgets
    attacks: tuple[str, ...]
    steps: int = 10
    restarts: int = 2
    queries: int = 500
    checks: bool = True


def linf_robustness(
    view: nn.Module,
    judge: nn.Module,
    x: Tensor,
    y: Tensor,
    attempted: int,
    plan: LinfPlan,
    *,
    twin: nn.Module | None = None,
    seed: int = 0,
    batch_size: int = 500,
    on_step: Callable[[str], None] | None = None,
) -> Robustness:
    """Every attack of `plan` at every budget on the correctly classified images `x`
    `[n, C, H, W]` (labels `y`) of `attempted` inputs: gradients from `view` (differentiable),
    random search and every verdict on `judge` (the deployed model); `twin`, the float model
    with the same weights, for the transfer check (None: no transfer check)."""
    result = Robustness(plan.budgets, attempted, len(y))

    def step(text: str) -> None:
        if on_step:
            on_step(text)

    def run(name: str, budget: float, *, steps: int | None = None, restarts: int = 1,
            source: nn.Module | None = None, role: str = "attack") -> Outcome:
        kind, _, estimator = name.partition("-")
        label = plan.budgets.label(budget)
        step(f"{name} eps={label}")
        torch.manual_seed(seed)
        fooled = torch.zeros(len(y), dtype=torch.bool)
        if kind == "square":
            if len(y):
                fooled = judge_fooled(judge, square(judge, x, y, budget, queries=plan.queries),
                                      y, batch_size)
            return Outcome(name, budget, fooled, queries=plan.queries, role=role)
        if kind == "transfer":
            kind, _, estimator = estimator.partition("-")
        for _ in range(1 if kind == "fgsm" else restarts):
            todo = (~fooled).nonzero().flatten()
            if len(todo) == 0:
                break
            if kind == "fgsm":
                x_adv = fgsm(source or view, x[todo], y[todo], budget, grad=estimator)
            else:
                x_adv = pgd(source or view, x[todo], y[todo], budget, grad=estimator,
                            steps=steps or plan.steps)
            fooled[todo] = judge_fooled(judge, x_adv, y[todo], batch_size)
        return Outcome(name, budget, fooled, steps=1 if kind == "fgsm" else steps or plan.steps,
                       restarts=1 if kind == "fgsm" else restarts, role=role)

    for budget in plan.budgets.values:
        for name in plan.attacks:
            result.outcomes.append(run(name, budget, restarts=plan.restarts))
    gradient = [n for n in plan.attacks if n.startswith(("pgd-", "fgsm-"))]
    pgds = [n for n in plan.attacks if n.startswith("pgd-")]
    if plan.checks and pgds and len(y):
        probe = _probe_budget(result)
        best = _best_of(result, pgds, probe)
        strong = run(best, probe, steps=5 * plan.steps, restarts=2 * plan.restarts,
                     role="strong")
        strong.name = f"{best}-{5 * plan.steps}x{2 * plan.restarts}"
        result.outcomes.append(strong)
        if plan.budgets.large is not None:
            for name in dict.fromkeys([_best_of(result, pgds, plan.budgets.values[-1]),
                                       *(["square"] if "square" in plan.attacks else [])]):
                result.outcomes.append(run(name, plan.budgets.large, restarts=plan.restarts,
                                           role="large"))
        if twin is not None:
            for budget in plan.budgets.values:
                name = f"transfer-{_best_of(result, pgds, budget)}"
                result.outcomes.append(run(name, budget, restarts=plan.restarts, source=twin,
                                           role="transfer"))
        elif gradient:
            result.notes.append("transfer check not run: the deployed model is the float model")
    result.checks = linf_checks(result, plan)
    return result


def _best_of(result: Robustness, names: Sequence[str], budget: float) -> str:
    """Of attacks `names`, the one that fools the most inputs at `budget` (first on ties)."""
    scored = [o for o in result.at(budget, extra=False) if o.name in names]
    if not scored:
        return names[0]
    return max(scored, key=lambda o: (int(o.fooled.sum()), -names.index(o.name))).name


def _probe_budget(result: Robustness) -> float:
    """The curve's budget where the worst case is least settled (success nearest 50 %), where
    more iterations have the most room to change it."""
    values = result.budgets.values
    return min(values, key=lambda b: (abs(float(result.worst(b).float().mean()) - 0.5), b))


def _check(ok: bool, figure: Any, detail: str, warning: str = "") -> dict[str, Any]:
    return {"status": "pass" if ok else "warn", "figure": figure,
            "detail": detail if ok or not warning else f"{warning}: {detail}"}


def _pp(value: float) -> str:
    return f"{100 * value:+.1f} points"


def linf_checks(result: Robustness, plan: LinfPlan) -> dict[str, dict[str, Any]]:
    """The sanity checks whose attacks ran (see the module docstring)."""
    checks: dict[str, dict[str, Any]] = {}
    budgets = plan.budgets
    if not result.correct:
        return checks
    curve = [(b, float(result.worst(b).float().mean())) for b in budgets.values if result.at(b)]
    if len(curve) > 1:
        drops = [(a, b, sa - sb) for (a, sa), (b, sb) in zip(curve, curve[1:], strict=False)]
        a, b, drop = max(drops, key=lambda d: d[2])
        checks["success_rises"] = _check(
            drop <= 1 / result.correct + 1e-9, {budgets.label(v): s for v, s in curve},
            f"worst-case success over the budgets {_rates(curve)}",
            f"success falls from {budgets.label(a)} to {budgets.label(b)}")
    if budgets.large is not None and result.at(budgets.large):
        rate = float(result.worst(budgets.large).float().mean())
        checks["large_budget"] = _check(
            rate >= ALL, rate, f"{100 * rate:.1f} % of inputs fooled at L-inf "
            f"{budgets.label(budgets.large)} (needs >= {100 * ALL:.0f} %)",
            "attacks fail where any input can be changed beyond recognition: gradient masking "
            "likely")
    gaps = []
    for o in result.outcomes:
        if o.name.startswith("fgsm-") and not o.extra:
            twin = [p for p in result.at(o.budget, extra=False)
                    if p.name == "pgd-" + o.name[len("fgsm-"):]]
            if twin:
                gaps.append((twin[0].success_rate - o.success_rate, o))
    if gaps:
        gap, o = min(gaps, key=lambda g: g[0])
        checks["pgd_vs_fgsm"] = _check(
            gap >= -FEW_POINTS, gap, f"smallest PGD - FGSM success {_pp(gap)} "
            f"({o.name[len('fgsm-'):]} at {budgets.label(o.budget)})",
            "FGSM beats PGD: PGD is not converging (masked or noisy gradients)")
    strong = next((o for o in result.outcomes if o.role == "strong"), None)
    if strong is not None:
        base_name = strong.name.rsplit("-", 1)[0]
        base = next(o for o in result.at(strong.budget, extra=False) if o.name == base_name)
        rise = result.robust_accuracy(strong.fooled) - result.robust_accuracy(base.fooled)
        checks["more_iterations"] = _check(
            rise <= FEW_POINTS / 3 + 1e-9, rise,
            f"robust accuracy under {strong.name} (steps x restarts) minus {base_name} "
            f"({base.steps}x{base.restarts}) at {budgets.label(strong.budget)}: {_pp(rise)}",
            "more iterations raise robust accuracy: the attack is noisy or masked")
    gradient_union = {b: _union(result, b, lambda o: o.name.startswith(("pgd-", "fgsm-")))
                      for b in budgets.values}
    search = [(o.success_rate - float(gradient_union[o.budget].float().mean()), o)
              for o in result.outcomes if o.name == "square" and o.budget in gradient_union
              and not o.extra and any(gradient_union[o.budget].shape)]
    if search and any(n.startswith(("pgd-", "fgsm-")) for n in plan.attacks):
        gap, o = max(search, key=lambda g: g[0])
        only = int((o.fooled & ~gradient_union[o.budget]).sum())
        checks["gradient_free"] = _check(
            gap <= FEW_POINTS, gap, f"square - best of the gradient attacks {_pp(gap)} at "
            f"{budgets.label(o.budget)} ({only} inputs fooled only by square)",
            "gradient masking likely")
    transfers = [(o.success_rate - float(gradient_union[o.budget].float().mean()), o)
                 for o in result.outcomes if o.role == "transfer"]
    if transfers:
        gap, o = max(transfers, key=lambda g: g[0])
        checks["transfer"] = _check(
            gap <= FEW_POINTS, gap, f"{o.name} from the float twin - white-box gradient "
            f"attacks {_pp(gap)} at {budgets.label(o.budget)}",
            "gradient masking likely: the float twin's gradients work better than the "
            "deployed model's own")
    return checks


def _rates(curve: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"{100 * s:.1f} %" for _, s in curve)


def _union(result: Robustness, budget: float, keep: Callable[[Outcome], bool]) -> Tensor:
    fooled = torch.zeros(result.correct, dtype=torch.bool)
    for o in result.at(budget, extra=False):
        if keep(o):
            fooled |= o.fooled
    return fooled


def sparse_robustness(
    results: dict[str, tuple[Sequence[int], Sequence[bool]]],
    attempted: int,
    entries: int,
    budgets: Budgets,
) -> Robustness:
    """Robustness of event data under L0 budgets from sparse attacks run without a budget:
    `results[name] = (l0 per input, fooled per input)`; an input is fooled within budget b when
    its attack succeeded with L0 <= b * entries. Checks: `success_rises`, `large_budget`
    (success without a budget)."""
    correct = len(next(iter(results.values()))[0]) if results else 0
    result = Robustness(budgets, attempted, correct)
    for name, (l0s, fooled) in results.items():
        l0 = torch.as_tensor(list(l0s), dtype=torch.float64)
        won = torch.as_tensor(list(fooled), dtype=torch.bool)
        for budget in budgets.values:
            result.outcomes.append(Outcome(name, budget, won & (l0 <= budget * entries)))
        result.outcomes.append(Outcome(name, None, won, role="unbudgeted"))  # type: ignore[arg-type]
    if correct:
        curve = [(b, float(result.worst(b).float().mean())) for b in budgets.values]
        drops = [sa - sb for (_, sa), (_, sb) in zip(curve, curve[1:], strict=False)]
        result.checks["success_rises"] = _check(
            max(drops, default=0.0) <= 0, {budgets.label(b): s for b, s in curve},
            f"worst-case success over the budgets {_rates(curve)}",
            "success falls as the budget grows")
        rate = float(result.worst(None).float().mean())  # type: ignore[arg-type]
        result.checks["large_budget"] = _check(
            rate >= ALL, rate, f"{100 * rate:.1f} % of inputs fooled without an L0 budget "
            f"(needs >= {100 * ALL:.0f} %)", "sparse attacks fail without a budget")
    result.notes.append("checks against gradient masking (PGD vs FGSM, more iterations, "
                        "gradient-free, transfer) apply to L-inf attacks on images")
    return result
