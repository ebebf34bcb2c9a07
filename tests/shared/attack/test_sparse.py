"""shared.attack.sparse: SDA on binary event frames and the top-k gradient baseline."""

from __future__ import annotations

import pytest
import torch

from shared.attack import AttackError, margin, sda, topk_baseline
from shared.data import load_dataset


def test_sda_invariants(event_victim, correct_event_samples):
    for sample, label in correct_event_samples(event_victim, 4):
        result = sda(event_victim, sample, label)
        x_adv = result.x_adv
        assert x_adv.shape == sample.shape and x_adv.dtype == sample.dtype
        assert ((x_adv == 0) | (x_adv == 1)).all()
        assert result.clean_correct and result.success  # no budget: it gets there
        with torch.no_grad():
            assert event_victim(x_adv).argmax(1).item() != label.item()
        assert result.l0 == int((x_adv != sample).sum()) == len(result.flips) > 0
        assert result.l0 <= result.l0_generated
        assert result.forward_passes > result.backward_passes >= 1
        # undoing one more flip in the reduction order breaks the attack
        undo = x_adv.clone()
        undo.view(-1)[result.flips[0]] = sample.view(-1)[result.flips[0]]
        with torch.no_grad():
            assert event_victim(undo).argmax(1).item() == label.item()
        # reduction only removes flips from the same (deterministic) generation
        unreduced = sda(event_victim, sample, label, reduction=False)
        assert unreduced.l0 == unreduced.l0_generated == result.l0_generated >= result.l0
        assert torch.equal(sda(event_victim, sample, label).x_adv, x_adv)  # reproducible


def test_topk_baseline_is_binary_and_misclassified(event_victim, correct_event_samples):
    for sample, label in correct_event_samples(event_victim, 3):
        result = topk_baseline(event_victim, sample, label)
        assert ((result.x_adv == 0) | (result.x_adv == 1)).all()
        if result.success:
            with torch.no_grad():
                assert event_victim(result.x_adv).argmax(1).item() != label.item()
        assert result.forward_passes == result.backward_passes  # no finite differences


def test_sda_failure_returns_the_clean_input(blind_victim):
    """A victim whose logits ignore the input: no flip can help, the attack must fail."""
    model = blind_victim
    sample = load_dataset("dvs-digits", "test").tensors[0][0].unsqueeze(1)
    result = sda(model, sample, torch.tensor([9]), max_iterations=3)
    assert not result.success and result.clean_correct
    assert torch.equal(result.x_adv, sample) and result.l0 == 0 and result.flips == ()
    already_wrong = sda(model, sample, torch.tensor([2]))
    assert not already_wrong.clean_correct and already_wrong.l0 == 0


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (torch.full((8, 1, 2, 32, 32), 0.5), torch.tensor([1]), "binary"),
        (torch.zeros(8, 2, 2, 32, 32), torch.tensor([1, 2]), r"ONE sample"),
        (torch.zeros(8, 1, 2, 32, 32), torch.tensor([1.0]), "int64"),
        (torch.zeros(2, 32, 32), torch.tensor([1]), "ONE sample"),
    ],
)
def test_bad_sda_input_is_a_clear_error(event_victim, x, y, needle):
    with pytest.raises(AttackError, match=needle) as info:
        sda(event_victim, x, y)
    assert "\n" not in str(info.value)


def test_margin_is_negative_exactly_when_misclassified():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    torch.testing.assert_close(margin(logits, torch.tensor([0, 2])), torch.tensor([1.0, -2.0]))


def test_sda_takes_a_non_contiguous_sample(event_victim, correct_event_samples):
    sample, label = correct_event_samples(event_victim, 1)[0]
    strided = torch.zeros(*sample.shape[:-1], 2 * sample.shape[-1])[..., ::2]
    strided.copy_(sample)
    assert not strided.is_contiguous()
    a, b = sda(event_victim, strided, label), sda(event_victim, sample, label)
    assert torch.equal(a.x_adv, b.x_adv) and a.flips == b.flips
