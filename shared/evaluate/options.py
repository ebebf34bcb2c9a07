"""What `spikefed-evaluate` evaluates: `EvalOptions`, the light set `spikefed-run` ends with, and
the parsers of the command's text options (each bad value is one `EvaluateError` line)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from shared.errors import UserError


class EvaluateError(UserError):
    """A bad `spikefed-evaluate` option or an unusable checkpoint: one line, exit code 2."""


# the full set: PGD with every estimator (PDSG and each fixed surrogate), FGSM, the gradient-free
# square search on images; SDA and its top-k baseline on event frames (the others are skipped)
DEFAULT_ATTACKS = ("pgd-pdsg", "pgd-atan", "pgd-sigmoid", "pgd-triangle", "pgd-rectangle",
                   "fgsm-pdsg", "fgsm-atan", "square", "sda", "topk")


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate. `samples` is the number of test inputs each attack tries;
    `exact_samples` the number of inputs the integer engine is compared on.

    Budgets: `eps` the L-inf curve on images, `l0_budgets` the L0 curve on event frames (shares
    of a sample's entries), `budget` the headline; None takes the dataset's
    (`shared.attack.default_budgets`), an empty curve means the headline budget only. PGD runs
    `steps` steps from `restarts` random starts, square `queries` queries; `checks` also runs the
    checks' own attacks (large budget, 5x steps, transfer from the float twin)."""

    dataset: str | None = None  # None: the checkpoint's dataset
    data_dir: str | None = None
    time_steps: tuple[int, ...] = (1, 2, 4, 8)
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[float, ...] | None = None
    l0_budgets: tuple[float, ...] | None = None
    budget: float | None = None
    steps: int = 10
    restarts: int = 2
    queries: int = 500
    checks: bool = True
    samples: int = 200
    exact_samples: int = 1000
    chip: str = "edge-int8"
    chip_batch: int = 32
    batch_size: int = 500
    seed: int = 0


# the light set `spikefed-run` ends with: the headline budget only, one restart, a short square
# search and the checks that need no attack of their own (PGD vs FGSM, gradient-free)
LIGHT = EvalOptions(time_steps=(1, 2, 4), attacks=("pgd-pdsg", "pgd-atan", "fgsm-atan", "square"),
                    eps=(), l0_budgets=None, restarts=1, queries=100, checks=False, samples=100)


def light_options(dataset: str, **changes: Any) -> EvalOptions:
    """`LIGHT` with the attacks that apply to `dataset`: PGD (PDSG next to atan), FGSM and the
    square search on images, SDA on event frames, so the run's closing table has no skipped
    rows."""
    from shared.data import dataset_info

    events = dataset_info(dataset).time_steps is not None
    return replace(LIGHT, attacks=("sda",) if events else LIGHT.attacks, **changes)


def parse_time_steps(text: str) -> tuple[int, ...]:
    """`1,2,4` -> (1, 2, 4), duplicates dropped; every T >= 1."""
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise EvaluateError(f"--time-steps {text!r}: give integers, e.g. 1,2,4,8") from None
    if not steps or min(steps) < 1:
        raise EvaluateError(f"--time-steps {text!r}: every T must be >= 1, e.g. 1,2,4,8")
    return tuple(dict.fromkeys(steps))


def parse_budget(text: str, option: str = "--budget") -> float:
    """`8/255` or `0.3` (an L-inf radius), `0.25%` (an L0 share of a sample's entries) -> float."""
    part = text.strip()
    percent = part.endswith("%")
    try:
        value = float(Fraction(part.rstrip("%").strip())) / (100 if percent else 1)
    except (ValueError, ZeroDivisionError):
        raise EvaluateError(f"{option} {text!r} is not a number, fraction (8/255) or "
                            "percentage (0.25%)") from None
    if not 0 <= value <= 1:
        raise EvaluateError(f"{option} {text!r} must lie in [0, 1] (inputs are in [0, 1]; "
                            "an L0 share in [0 %, 100 %])")
    return value


def parse_l0_budgets(text: str) -> tuple[float, ...]:
    """`0.1%,0.25%` (or `0.001,0.0025`) -> (0.001, 0.0025): shares of a sample's entries."""
    values = tuple(parse_budget(p, "--l0-budgets") for p in text.split(",") if p.strip())
    if not values:
        raise EvaluateError("--l0-budgets needs at least one value, e.g. 0.1%,0.25%")
    return values


def parse_eps(text: str) -> tuple[float, ...]:
    """`8/255,0.1` -> (0.0313..., 0.1); eps is an L-inf radius on inputs in [0, 1]."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise EvaluateError(f"--eps {part!r} is not a number or fraction (8/255)") from None
        if not 0 <= value <= 1:
            raise EvaluateError(f"--eps {part!r} must lie in [0, 1] (inputs are in [0, 1])")
        values.append(value)
    if not values:
        raise EvaluateError("--eps needs at least one value, e.g. 8/255,16/255")
    return tuple(values)


def check_chip(preset: str) -> str:
    """`preset` if it names a chip preset of `shared.neurocore`."""
    from shared.neurocore import PRESETS

    if preset not in PRESETS:
        raise EvaluateError(f"unknown chip preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset


def parse_attacks(text: str) -> tuple[str, ...]:
    """`pgd-pdsg,sda` -> ("pgd-pdsg", "sda"): sda, topk, square, or pgd-/fgsm-<estimator>."""
    from shared.attack import ESTIMATORS

    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    for name in names:
        kind, _, estimator = name.partition("-")
        if name in ("sda", "topk", "square"):
            continue
        if kind not in ("pgd", "fgsm") or estimator not in ESTIMATORS:
            raise EvaluateError(
                f"unknown attack {name!r}: use sda, topk, square, or pgd-/fgsm- with an "
                "estimator of "
                f"{', '.join(ESTIMATORS)} (e.g. pgd-pdsg)"
            )
    return names
