"""Attack metrics: success over correctly classified inputs, L0, budgets, passes.

An attack is only scored on inputs the victim classifies correctly (an input it already gets
wrong needs no attack). For those, the success rate is the share the attack turns into a
misclassification; L0 is the number of input entries the adversarial example changes (for event
frames: flipped events), reported as a count and as a percentage of the sample's entries, mean
and median over the successful attacks. Success under an L0 budget B counts a success only when
its L0 <= B.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
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
    mean_l0: float  # over successful attacks (nan when none)
    median_l0: float
    mean_l0_percent: float  # mean L0 as % of a sample's entries
    median_l0_percent: float
    budget_success: dict[int, float] = field(default_factory=dict)  # L0 budget -> success rate
    forward_passes: int = 0
    backward_passes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _l0_stats(l0s: list[int], entries: int) -> tuple[float, float, float, float]:
    if not l0s:
        nan = float("nan")
        return nan, nan, nan, nan
    mean, median = statistics.fmean(l0s), float(statistics.median(l0s))
    return mean, median, 100 * mean / entries, 100 * median / entries


def summarize_sparse(
    name: str, results: Sequence[SparseResult], budgets: Sequence[int] = ()
) -> AttackSummary:
    """Scores of sparse attacks, one `SparseResult` per sample (misclassified inputs skipped)."""
    scored = [r for r in results if r.clean_correct]
    if not scored:
        raise AttackError("no correctly classified sample to score the attack on")
    wins = [r.l0 for r in scored if r.success]
    mean, median, mean_pct, median_pct = _l0_stats(wins, scored[0].entries)
    return AttackSummary(
        name=name,
        eps=None,
        samples=len(scored),
        success_rate=len(wins) / len(scored),
        mean_l0=mean,
        median_l0=median,
        mean_l0_percent=mean_pct,
        median_l0_percent=median_pct,
        budget_success={b: sum(v <= b for v in wins) / len(scored) for b in budgets},
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
    correct = predict(model, x, batch_size) == y
    x_ok, y_ok = x[correct], y[correct]
    if len(y_ok) == 0:
        raise AttackError("the model classifies none of the samples correctly: nothing to attack")
    fooled, l0s, steps_run = [], [], 1 if attack == "fgsm" else steps
    for i in range(0, len(y_ok), batch_size):
        xb, yb = x_ok[i : i + batch_size], y_ok[i : i + batch_size]
        if attack == "fgsm":
            x_adv = fgsm(model, xb, yb, eps, grad=grad)
        else:
            x_adv = pgd(model, xb, yb, eps, grad=grad, steps=steps)
        wrong = predict(model, x_adv, batch_size) != yb
        fooled.append(wrong)
        l0s += (x_adv != xb).flatten(1).sum(1)[wrong].tolist()
    rate = float(torch.cat(fooled).float().mean())
    mean, median, mean_pct, median_pct = _l0_stats(l0s, x[0].numel())
    n = len(y_ok)
    return AttackSummary(
        name=f"{attack}-{grad}", eps=float(eps), samples=n, success_rate=rate, mean_l0=mean,
        median_l0=median, mean_l0_percent=mean_pct, median_l0_percent=median_pct,
        forward_passes=n * (steps_run + 1), backward_passes=n * steps_run,
    )
