"""shared.attack.metrics: success over correctly classified inputs, L0, budgets, passes, and the
attack rows of spikefed-evaluate."""

from __future__ import annotations

import math

import pytest
import torch

from shared.attack import (
    AttackError,
    SparseResult,
    correctly_classified,
    fooled,
    gradient_attack_success,
    sda,
    summarize,
    summarize_sparse,
    topk_baseline,
)
from shared.data import load_dataset


def _result(l0: int, success: bool, clean_correct: bool = True, passes: int = 3) -> SparseResult:
    return SparseResult(x_adv=torch.zeros(8, 1, 2, 5, 5), success=success, l0=l0,
                        forward_passes=passes, backward_passes=1, iterations=1, l0_generated=l0,
                        clean_correct=clean_correct)


def test_gradient_attack_success_scores_correct_inputs_only(image_victim, digits_test):
    x, y = digits_test(100)
    torch.manual_seed(0)
    summary = gradient_attack_success(image_victim, x, y, 0.15, grad="pdsg", steps=3)
    with torch.no_grad():
        correct = int((image_victim(x).argmax(1) == y).sum())
    assert summary.samples == correct and 0 < summary.success_rate <= 1
    assert summary.name == "pgd-pdsg" and summary.eps == 0.15
    assert summary.forward_passes == correct * 4 and summary.backward_passes == correct * 3
    assert summary.mean_l0 <= 64


def test_summarize_sparse_on_topk_results(event_victim, correct_event_samples):
    results = [topk_baseline(event_victim, sample, label)
               for sample, label in correct_event_samples(event_victim, 3)]
    summary = summarize_sparse("topk", results, budgets=(10, 10_000))
    assert summary.samples == 3 and summary.budget_success[10_000] == summary.success_rate


def test_summarize_sparse_skips_inputs_already_misclassified(blind_victim):
    sample = load_dataset("dvs-digits", "test").tensors[0][0].unsqueeze(1)
    result = sda(blind_victim, sample, torch.tensor([9]), max_iterations=3)
    already_wrong = sda(blind_victim, sample, torch.tensor([2]))
    summary = summarize_sparse("sda", [result, already_wrong], budgets=(5,))
    assert summary.samples == 1 and summary.success_rate == 0.0 and math.isnan(summary.mean_l0)


def test_summarize_scores_l0_over_successes_only():
    summary = summarize("sda", None, [True, False, True, True], [4, 100, 2, 9], entries=400,
                        budgets=(4, 10), forward_passes=40, backward_passes=8)
    assert summary.samples == 4 and summary.success_rate == 0.75
    assert summary.mean_l0 == 5.0 and summary.median_l0 == 4.0
    assert summary.mean_l0_percent == 1.25 and summary.median_l0_percent == 1.0
    assert summary.budget_success == {4: 0.5, 10: 0.75}
    assert summary.passes_per_sample == 12.0


def test_summarize_without_inputs_or_l0():
    empty = summarize("pgd-pdsg", 8 / 255, [])
    assert empty.samples == 0 and empty.success_rate == 0.0 and empty.passes_per_sample == 0
    no_l0 = summarize("pgd-pdsg", 8 / 255, [True, False])
    assert no_l0.success_rate == 0.5 and math.isnan(no_l0.mean_l0)
    with pytest.raises(AttackError, match="2 L0 values for 3"):
        summarize("sda", None, [True, True, False], [1, 2])


def test_sparse_judged_elsewhere_counts_every_result():
    """A stand-in attacked, the deployed model judged: every result scores, its verdict wins."""
    results = [_result(5, True), _result(0, False, clean_correct=False), _result(7, True)]
    summary = summarize_sparse("sda", results, judged=[True, False, False])
    assert summary.samples == 3 and summary.success_rate == pytest.approx(1 / 3)
    assert summary.mean_l0 == 5.0 and summary.median_l0_percent == 100 * 5 / 400
    assert summary.forward_passes == 9 and summary.backward_passes == 3
    default = summarize_sparse("sda", results)  # the attacked model's own verdicts
    assert default.samples == 2 and default.success_rate == 1.0 and default.mean_l0 == 6.0
    assert summarize_sparse("sda", [], judged=[]).samples == 0
    with pytest.raises(AttackError, match="no correctly classified sample"):
        summarize_sparse("sda", [_result(0, False, clean_correct=False)])
    with pytest.raises(AttackError, match="1 judgements for 2"):
        summarize_sparse("sda", results[:2], judged=[True])


def test_rows_of_spikefed_evaluate():
    gradient = summarize("pgd-pdsg", 8 / 255, [True, False, False, False]).as_row(attempted=5)
    assert gradient == {"name": "pgd-pdsg", "eps": 8 / 255, "success_rate": 0.25,
                        "mean_l0": None, "median_l0": None, "samples": 4, "attempted": 5}
    sparse = summarize_sparse("sda", [_result(3, True), _result(0, False)],
                              judged=[True, False]).as_row(attempted=2)
    assert sparse == {"name": "sda", "eps": None, "success_rate": 0.5, "mean_l0": 3.0,
                      "median_l0": 3.0, "median_l0_percent": 0.75, "samples": 2,
                      "attempted": 2, "passes_per_sample": 4.0}
    missed = summarize_sparse("topk", [_result(0, False)], judged=[False]).as_row(attempted=1)
    assert missed["mean_l0"] is None and missed["median_l0_percent"] is None


def test_correctly_classified_and_fooled_judge_with_the_model(image_victim, digits_test):
    x, y = digits_test(50)
    with torch.no_grad():
        right = image_victim(x).argmax(1) == y
    x_ok, y_ok = correctly_classified(image_victim, x, y, batch_size=16)
    assert torch.equal(x_ok, x[right]) and torch.equal(y_ok, y[right])
    assert fooled(image_victim, x_ok, y_ok) == [False] * len(y_ok)
    assert fooled(image_victim, x_ok, (y_ok + 1) % 10) == [True] * len(y_ok)
