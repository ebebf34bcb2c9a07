"""Adversarial robustness of a (global) spiking net, from an attacker who knows the weights and
neuron constants but not the training surrogate.

    from shared.attack import fgsm, pgd, sda
    x_adv = pgd(model, x, y, eps=8 / 255, grad="pdsg")          # images [B, C, H, W] in [0, 1]
    result = sda(model, x_events, y)                            # one event sample [T, 1, C, H, W]
    result.x_adv, result.success, result.l0, result.forward_passes, result.backward_passes

- `estimators`: the spike-derivative estimators, `pdsg` and every `shared.snn.SURROGATES` name,
  swapped into the victim only for the attack (`gradient_estimator`).
- `gradient`: FGSM and PGD (L-inf) on the time-averaged logits.
- `sparse`: SDA on binary event frames and the plain top-k gradient baseline.
- `search`: `square`, a gradient-free L-inf random search that only queries predictions.
- `robustness`: per-dataset budgets, robust accuracy as the worst case per input over every
  attack, and the sanity checks against gradient masking.
- `metrics`: success rate over correctly classified inputs, L0, budgets, passes; the attack
  rows of `spikefed-evaluate` (`AttackSummary.as_row`).

Every bad argument raises `AttackError` (a `ValueError`) with a one-line message.
"""

from .errors import AttackError
from .estimators import ESTIMATORS, PDSG, get_estimator, gradient_estimator
from .gradient import fgsm, pgd
from .metrics import (
    AttackSummary,
    correctly_classified,
    fooled,
    gradient_attack_success,
    summarize,
    summarize_sparse,
)
from .robustness import (
    Budgets,
    LinfPlan,
    Robustness,
    default_budgets,
    linf_robustness,
    sparse_robustness,
    with_budgets,
)
from .search import square
from .sparse import SparseResult, margin, sda, topk_baseline

__all__ = [
    "ESTIMATORS",
    "PDSG",
    "AttackError",
    "AttackSummary",
    "Budgets",
    "LinfPlan",
    "Robustness",
    "SparseResult",
    "correctly_classified",
    "default_budgets",
    "fgsm",
    "fooled",
    "get_estimator",
    "gradient_attack_success",
    "gradient_estimator",
    "linf_robustness",
    "margin",
    "pgd",
    "sda",
    "sparse_robustness",
    "square",
    "summarize",
    "summarize_sparse",
    "topk_baseline",
    "with_budgets",
]
