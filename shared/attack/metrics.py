"""Attack metrics: success over correctly classified inputs, L0, budgets, passes.

An attack is only scored on inputs the victim classifies correctly (an input it already gets
wrong needs no attack). For those, the success rate is the share the attack turns into a
misclassification; L0 is the number of input entries the adversarial example changes (for event
frames: flipped events), reported as a count and as a percentage of the sample's entries, mean
and median over the successful attacks. Success under an L0 budget B counts a success only when
its L0 <= B.

`summarize` scores per-input outcomes; `summarize_sparse` and `gradient_attack_success` feed it,
and `AttackSummary.as_row` is the row `spikefed-evaluate --json` lists under `attacks`. When the
attack runs on a stand-in of the deployed model (a differentiable view), the caller picks the
inputs with `correctly_classified` and judges them with `fooled` on the deployed model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from shared.snn import predict

from .errors import AttackError
from .gradient import fgsm, pgd
from .sparse import SparseResult


@dataclass(frozen=True)
class AttackSummary:
    """One attack's scores on a set of inputs (see the module docstring)."""

    name: str
    eps: float | None  # L-inf radius of a gradient attack; None for sparse attacks
    samples: int  # correctly classified inputs attacked
    success_rate: float  # 0..1 over `samples`
    mean_l0: float  # over successful attacks (nan when none, or L0 not measured)
    median_l0: float
    mean_l0_percent: float  # mean L0 as % of a sample's entries
    median_l0_percent: float
    budget_success: dict[int, float] = field(default_factory=dict)  # L0 budget -> success rate
    forward_passes: int = 0
    backward_passes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def as_row(self, attempted: int) -> dict[str, Any]:
        """The row of `spikefed-evaluate --json`'s `attacks` list; `attempted` counts the inputs
        tried before the misclassified ones were set aside. L0 is reported for sparse attacks
        (eps None, whose budget it is), with the passes per scored input; nan becomes None."""
        row: dict[str, Any] = {"name": self.name, "eps": self.eps,
                               "success_rate": self.success_rate, "mean_l0": None,
                               "median_l0": None, "samples": self.samples,
                               "attempted": attempted}
        if self.eps is None:
            row |= {"mean_l0": _none_if_nan(self.mean_l0),
                    "median_l0": _none_if_nan(self.median_l0),
                    "median_l0_percent": _none_if_nan(self.median_l0_percent),
                    "passes_per_sample": self.passes_per_sample}
        return row

    @property
    def passes_per_sample(self) -> float:
        """Forward plus backward passes per scored input (0 when none was scored)."""
        passes = self.forward_passes + self.backward_passes
        return passes / self.samples if self.samples else 0


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def _l0_stats(l0s: Sequence[int], entries: int) -> tuple[float, float, float, float]:
    if not l0s:
        nan = float("nan")
        return nan, nan, nan, nan
    mean, median = statistics.fmean(l0s), float(statistics.median(l0s))
    return mean, median, 100 * mean / entries, 100 * median / entries


def summarize(
    name: str,
    eps: float | None,
    fooled: Sequence[bool],
    l0: Sequence[int] | None = None,
    *,
    entries: int = 1,
    budgets: Sequence[int] = (),
    forward_passes: int = 0,
    backward_passes: int = 0,
) -> AttackSummary:
    """Scores of one attack from per-input outcomes on correctly classified inputs: `fooled[i]`
    whether input i ended misclassified, `l0[i]` how many of its `entries` the attack changed
    (None: L0 not measured, reported as nan). No input scores a success rate of 0."""
    if l0 is not None and len(l0) != len(fooled):
        raise AttackError(f"{len(l0)} L0 values for {len(fooled)} attacked inputs")
    n = len(fooled)
    wins = [v for v, won in zip(l0 or (), fooled, strict=False) if won]
    mean, median, mean_pct, median_pct = _l0_stats(wins, entries)
    return AttackSummary(
        name=name,
        eps=None if eps is None else float(eps),
        samples=n,
        success_rate=sum(map(bool, fooled)) / n if n else 0.0,
        mean_l0=mean,
        median_l0=median,
        mean_l0_percent=mean_pct,
        median_l0_percent=median_pct,
        budget_success={b: sum(v <= b for v in wins) / n if n else 0.0 for b in budgets},
        forward_passes=forward_passes,
        backward_passes=backward_passes,
    )


def correctly_classified(model: nn.Module, x: Tensor, y: Tensor,
                         batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """The samples of `x` (dataset layout) that `model` classifies as `y`, with their labels."""
    keep = predict(model, x, batch_size) == y
    return x[keep], y[keep]


def fooled(model: nn.Module, x_adv: Tensor, y: Tensor, batch_size: int = 500) -> list[bool]:
    """Per sample of `x_adv` (dataset layout): whether `model` misclassifies it."""
    return (predict(model, x_adv, batch_size) != y).tolist()


def summarize_sparse(
    name: str,
    results: Sequence[SparseResult],
    budgets: Sequence[int] = (),
    *,
    judged: Sequence[bool] | None = None,
) -> AttackSummary:
    """Scores of sparse attacks, one `SparseResult` per sample.

    By default the attacked model is the judge: misclassified inputs (`clean_correct` False) are
    skipped and a success is `result.success`. With `judged` (whether the deployed model
    misclassifies each `x_adv`, for an attack run on a stand-in) every result counts, as the
    caller chose correctly classified inputs on the deployed model. Passes count every result."""
    if judged is None:
        scored = [r for r in results if r.clean_correct]
        if not scored:
            raise AttackError("no correctly classified sample to score the attack on")
        wins = [r.success for r in scored]
    else:
        if len(judged) != len(results):
            raise AttackError(f"{len(judged)} judgements for {len(results)} sparse results")
        scored, wins = list(results), list(judged)
    return summarize(
        name, None, wins, [r.l0 for r in scored],
        entries=scored[0].entries if scored else 1, budgets=budgets,
        forward_passes=sum(r.forward_passes for r in results),
        backward_passes=sum(r.backward_passes for r in results),
    )


def gradient_attack_success(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    attack: str = "pgd",
    grad: str = "pdsg",
    steps: int = 10,
    batch_size: int = 100,
) -> AttackSummary:
    """FGSM or PGD on dataset samples `x` (`[N, C, H, W]` images) with labels `y`, scored over
    the correctly classified ones. Passes count sample forwards and backwards."""
    if attack not in ("fgsm", "pgd"):
        raise AttackError(f"unknown gradient attack {attack!r}; choose 'fgsm' or 'pgd'")
    if x.dim() != 4:
        raise AttackError(
            f"gradient attacks take direct-coded images [N, C, H, W], got {tuple(x.shape)}"
        )
    x_ok, y_ok = correctly_classified(model, x, y, batch_size)
    if len(y_ok) == 0:
        raise AttackError("the model classifies none of the samples correctly: nothing to attack")
    wins: list[bool] = []
    l0s: list[int] = []
    steps_run = 1 if attack == "fgsm" else steps
    for i in range(0, len(y_ok), batch_size):
        xb, yb = x_ok[i : i + batch_size], y_ok[i : i + batch_size]
        if attack == "fgsm":
            x_adv = fgsm(model, xb, yb, eps, grad=grad)
        else:
            x_adv = pgd(model, xb, yb, eps, grad=grad, steps=steps)
        wins += fooled(model, x_adv, yb, batch_size)
        l0s += (x_adv != xb).flatten(1).sum(1).tolist()
    n = len(y_ok)
    return summarize(f"{attack}-{grad}", eps, wins, l0s, entries=x[0].numel(),
                     forward_passes=n * (steps_run + 1), backward_passes=n * steps_run)
