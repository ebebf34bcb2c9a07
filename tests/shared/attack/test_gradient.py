"""shared.attack.gradient: FGSM and PGD (L-inf) on the time-averaged logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.attack import AttackError, fgsm, pgd
from shared.snn import build_model


def test_pgd_and_fgsm_stay_in_the_ball_and_the_valid_range(image_victim, digits_test):
    x, y = digits_test(64)
    eps = 0.1
    for x_adv in (pgd(image_victim, x, y, eps), fgsm(image_victim, x, y, eps, grad="triangle")):
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(pgd(image_victim, x, y, 0.0), x)  # eps 0 changes nothing


def test_pgd_raises_the_loss_and_fools_more_than_fgsm_or_noise(image_victim, digits_test):
    x, y = digits_test(200)

    def loss_and_error(inputs):
        with torch.no_grad():
            logits = image_victim(inputs)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()

    torch.manual_seed(0)
    eps = 0.15
    noise = (x + eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)).clamp(0, 1)
    clean_loss, clean_err = loss_and_error(x)
    noise_loss, noise_err = loss_and_error(noise)
    fgsm_loss, fgsm_err = loss_and_error(fgsm(image_victim, x, y, eps))
    pgd_loss, pgd_err = loss_and_error(pgd(image_victim, x, y, eps))
    assert pgd_loss > fgsm_loss > clean_loss and fgsm_loss > noise_loss
    assert pgd_err > max(noise_err, clean_err) + 0.2


def test_pgd_random_start_is_reproducible_with_the_global_seed(image_victim, digits_test):
    x, y = digits_test(16)
    torch.manual_seed(5)
    a = pgd(image_victim, x, y, 0.1, steps=2)
    torch.manual_seed(5)
    b = pgd(image_victim, x, y, 0.1, steps=2)
    torch.manual_seed(6)
    c = pgd(image_victim, x, y, 0.1, steps=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda m, x, y: pgd(m, x, y, -0.1), "eps must be"),
        (lambda m, x, y: fgsm(m, x, y, float("nan")), "eps must be"),
        (lambda m, x, y: pgd(m, x, y, 0.1, grad="superspike"), "unknown gradient estimator"),
        (lambda m, x, y: pgd(m, x, y, 0.1, steps=0), "steps must be"),
        (lambda m, x, y: fgsm(m, x, y.float(), 0.1), "int64"),
    ],
)
def test_bad_gradient_attack_arguments_are_clear_errors(image_victim, call, needle, digits_test):
    x, y = digits_test(4)
    with pytest.raises(AttackError, match=needle) as info:
        call(image_victim, x, y)
    assert "\n" not in str(info.value)


def test_non_differentiable_victim_is_a_clear_error(digits_test):
    from shared.quant import quantize

    model = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8,
                                 time_steps=2)).eval()
    x, y = digits_test(4)
    with pytest.raises(AttackError, match="not differentiable"):
        pgd(model, x, y, 0.1)
    assert not model.training
