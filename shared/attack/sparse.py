"""Sparse attacks on binary event frames: SDA and the plain top-k gradient baseline.

An event sample can only change by flipping entries (event <-> no event), so the attack budget is
the number of flips, L0. SDA (sparse dynamic attack, Lun et al., CVPR 2025) has two phases on the
C&W margin loss m(x) = z_y(x) - max_{j != y} z_j(x) of the time-averaged logits z:

Generation. At iteration n (0, 1, ...): one forward + backward gives g = dm/dx with the attacker's
gradient estimator. Flipping entry i changes m by about g_i (1 - 2 x_i) to first order; take the
k = 10 (n + 1) unflipped entries with the most negative such estimate, test each by a real
forward (the finite difference m(x xor e_i) - m(x), candidates batched), and flip together all
that lower m. Stop at the first misclassification (success) or after 500 iterations (failure).
When no candidate helps, x is unchanged, the tested ones are excluded and k grows.

Reduction. Sort the kept flips by |finite difference|, smallest first, and binary-search the
largest prefix that can be undone while the input stays misclassified. The search keeps "prefix
lo undone: misclassified" and "prefix hi undone: classified correctly" (hi = all flips undone is
the clean input), so it ends where undoing one more flip breaks the attack.

The baseline (`topk_baseline`) is generation without finite differences (the k best first-order
entries are flipped blindly) and without reduction.

Pass counts: `forward_passes` counts sample forwards (a batch of k candidates is k passes, as
if each were its own query), `backward_passes` the gradient computations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import AttackError
from .gradient import attack_mode, logits_with_grad

MAX_ITERATIONS = 500
K_STEP = 10  # k = K_STEP * (n + 1) candidates at generation iteration n
CHUNK = 256  # candidate samples per batched forward


@dataclass(frozen=True)
class SparseResult:
    """Outcome of a sparse attack on one sample.

    `x_adv` is binary with the input's shape and dtype; it equals the input on failure.
    `success` is True exactly when the victim misclassifies `x_adv`. `l0` counts the entries
    where `x_adv` differs from the input; `l0_generated` counts them before reduction.
    `clean_correct` is False when the victim already misclassified the input (then nothing is
    flipped and the sample does not count in a success rate). `flips` are the flat indices of
    the entries `x_adv` flips, in reduction order: SDA would undo `flips[0]` next (and that
    breaks the attack); for an unreduced attack the order of generation.
    """

    x_adv: Tensor
    success: bool
    l0: int
    forward_passes: int
    backward_passes: int
    iterations: int
    l0_generated: int
    clean_correct: bool
    flips: tuple[int, ...] = ()

    @property
    def entries(self) -> int:
        return self.x_adv.numel()

    @property
    def l0_percent(self) -> float:
        """L0 as a percentage of all entries of the sample."""
        return 100.0 * self.l0 / self.entries


def _check_events(x_events: Tensor, y: Tensor) -> Tensor:
    if not isinstance(x_events, Tensor) or not x_events.is_floating_point():
        raise AttackError("x_events must be a float tensor of binary event frames [T, 1, C, H, W]")
    if x_events.dim() != 5 or x_events.shape[1] != 1:
        raise AttackError(
            f"x_events must be ONE sample in model layout [T, 1, C, H, W], got shape "
            f"{tuple(x_events.shape)}"
        )
    if not ((x_events == 0) | (x_events == 1)).all():
        raise AttackError("x_events must be binary event frames (every entry 0 or 1)")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (1,):
        raise AttackError("y must be an int64 tensor of shape [1] (the sample's class id)")
    return x_events.detach().contiguous()


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """C&W margin z_y - max_{j != y} z_j per sample, `[B]`; negative means misclassified."""
    true = logits.gather(1, y.view(-1, 1).expand(len(logits), 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1).expand(len(logits), 1), float("-inf"))
    return true - others.amax(1)


class _Victim:
    """The model under attack with its pass counters."""

    def __init__(self, model: nn.Module, y: Tensor) -> None:
        self.model, self.y = model, y
        self.forward_passes = 0
        self.backward_passes = 0

    def margin_and_grad(self, x: Tensor) -> tuple[float, bool, Tensor]:
        """(margin, misclassified, d margin / dx) of one sample `[T, 1, ...]`."""
        x = x.detach().requires_grad_()
        logits = logits_with_grad(self.model, x)
        loss = margin(logits, self.y)[0]
        (grad,) = torch.autograd.grad(loss, x)
        self.forward_passes += 1
        self.backward_passes += 1
        return float(loss.detach()), bool(logits.argmax(1)[0] != self.y[0]), grad

    @torch.no_grad()
    def margins(self, x: Tensor, flat_flips: Tensor) -> Tensor:
        """Margins of `x` with each single entry of `flat_flips` flipped, `[len(flat_flips)]`."""
        out = []
        for chunk in flat_flips.split(CHUNK):
            batch = x.flatten().repeat(len(chunk), 1)  # [k, numel]
            rows = torch.arange(len(chunk))
            batch[rows, chunk] = 1 - batch[rows, chunk]
            # [k, T, 1, ...] -> model layout [T, k, ...]
            frames = batch.view(len(chunk), *x.shape).squeeze(2).transpose(0, 1)
            out.append(margin(self.model(frames), self.y))
            self.forward_passes += len(chunk)
        return torch.cat(out)

    @torch.no_grad()
    def misclassified(self, x: Tensor) -> bool:
        self.forward_passes += 1
        return bool(self.model(x).argmax(1)[0] != self.y[0])


def sda(
    model: nn.Module,
    x_events: Tensor,
    y: Tensor,
    *,
    grad: str = "pdsg",
    max_iterations: int = MAX_ITERATIONS,
    finite_differences: bool = True,
    reduction: bool = True,
) -> SparseResult:
    """Sparse attack on one binary event sample `x_events` `[T, 1, C, H, W]` with label `y` `[1]`.

    Generation and reduction as in the module docstring; `finite_differences=False` and
    `reduction=False` give the ablations (both off: `topk_baseline`). The victim is restored
    (its surrogates and train/eval mode) on return.
    """
    x_clean = _check_events(x_events, y)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
            or max_iterations < 1:
        raise AttackError(f"max_iterations must be an integer >= 1, got {max_iterations!r}")
    with attack_mode(model, grad):
        victim = _Victim(model, y)
        x, flips, effects, iterations, success = _generate(
            victim, x_clean, max_iterations, finite_differences
        )
        if iterations == 0 and success:  # the victim already got it wrong: nothing to attack
            return SparseResult(x_clean.clone(), True, 0, victim.forward_passes,
                                victim.backward_passes, 0, 0, clean_correct=False)
        if not success:
            return SparseResult(x_clean.clone(), False, 0, victim.forward_passes,
                                victim.backward_passes, iterations, 0, clean_correct=True)
        order = flips
        if reduction and flips:
            x, order = _reduce(victim, x, x_clean, flips, effects)
    l0 = int((x != x_clean).sum())
    return SparseResult(x, success, l0, victim.forward_passes, victim.backward_passes,
                        iterations, len(flips), clean_correct=True, flips=tuple(order))


def topk_baseline(
    model: nn.Module, x_events: Tensor, y: Tensor, *, grad: str = "pdsg",
    max_iterations: int = MAX_ITERATIONS,
) -> SparseResult:
    """Plain top-k gradient flipping: SDA's schedule without finite differences or reduction."""
    return sda(model, x_events, y, grad=grad, max_iterations=max_iterations,
               finite_differences=False, reduction=False)


def _generate(
    victim: _Victim, x_clean: Tensor, max_iterations: int, finite_differences: bool
) -> tuple[Tensor, list[int], list[float], int, bool]:
    """Generation: (x, flat indices flipped in order, |effect| of each, iterations, success)."""
    x = x_clean.clone()
    flat = x.view(-1)
    flipped = torch.zeros(x.numel(), dtype=torch.bool)
    rejected = torch.zeros_like(flipped)  # tested at the current x without helping
    flips: list[int] = []
    effects: list[float] = []
    n = 0
    for n in range(max_iterations + 1):
        loss, wrong, g = victim.margin_and_grad(x)
        if wrong:
            return x, flips, effects, n, True
        if n == max_iterations:
            break
        estimate = (g.view(-1) * (1 - 2 * flat)).masked_fill_(flipped | rejected, 0)
        eligible = int((estimate < 0).sum())
        if eligible == 0:
            break  # no entry lowers the margin, even to first order
        candidates = torch.topk(-estimate, min(K_STEP * (n + 1), eligible)).indices
        if finite_differences:
            differences = victim.margins(x, candidates) - loss
            helps = differences < 0
            if not helps.any():
                rejected[candidates] = True
                continue
            chosen, chosen_effects = candidates[helps], differences[helps].abs()
            rejected.zero_()
        else:
            chosen, chosen_effects = candidates, estimate[candidates].abs()
        flat[chosen] = 1 - flat[chosen]
        flipped[chosen] = True
        flips.extend(chosen.tolist())
        effects.extend(chosen_effects.tolist())
    return x, flips, effects, n, False


def _reduce(
    victim: _Victim, x_adv: Tensor, x_clean: Tensor, flips: list[int], effects: list[float]
) -> tuple[Tensor, list[int]]:
    """Reduction phase: undo the largest prefix (weakest flips first) that keeps the attack.

    Returns the reduced example and its remaining flips in reduction order."""
    order = torch.tensor(flips)[torch.tensor(effects).argsort(stable=True)]

    def undone(count: int) -> Tensor:
        x = x_adv.clone()
        idx = order[:count]
        x.view(-1)[idx] = x_clean.view(-1)[idx]
        return x

    lo, hi = 0, len(order)  # undone(lo) is misclassified, undone(hi) (the clean input) is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if victim.misclassified(undone(mid)):
            lo = mid
        else:
            hi = mid
    return undone(lo), order[lo:].tolist()
