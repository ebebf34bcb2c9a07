"""shared.attack.estimators: PDSG and the estimator swap (forward untouched, victim restored)."""

from __future__ import annotations

import math

import pytest
import torch

from shared.attack import (
    ESTIMATORS,
    PDSG,
    AttackError,
    fgsm,
    get_estimator,
    gradient_estimator,
    pgd,
    sda,
)
from shared.attack.estimators import pdsg_derivative_
from shared.data import load_dataset
from shared.snn import LIF, SURROGATES, model_layout, multistep_reference


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 3.0])
def test_pdsg_derivative_integrates_to_one_and_peaks_at_theta_plus_half_sigma(sigma: float):
    theta = 0.7
    u = torch.linspace(theta - 40 * sigma, theta + 40 * sigma, 800_001, dtype=torch.float64)
    g = pdsg_derivative_(u - theta, torch.tensor(sigma, dtype=torch.float64))
    assert torch.trapezoid(g, u).item() == pytest.approx(1.0, abs=1e-9)
    peak = int(g.argmax())
    assert u[peak].item() == pytest.approx(theta + sigma / 2, abs=1e-4 * sigma)
    assert g[peak].item() == pytest.approx(1 / (math.sqrt(2 * math.pi) * sigma), rel=1e-6)


def test_pdsg_sigma_is_running_std_per_channel_and_zero_maps_to_one():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 6, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [0.5, 1.0, 2.0, 0.0, 4.0], dtype=torch.float64).view(1, 1, 5, 1, 1)
    sigma = PDSG.sigma(x)
    assert sigma.shape == (4, 1, 5, 1, 1)
    for t in range(4):
        for c in range(5):
            seen = x[: t + 1, :, c]
            expected = seen.std(correction=0).item() if c != 3 else 1.0  # channel 3 is all zero
            assert sigma[t, 0, c].item() == pytest.approx(expected, rel=1e-9)
    linear = PDSG.sigma(torch.randn(3, 4, 7, generator=gen))  # [T, B, F]: per feature
    assert linear.shape == (3, 1, 7)
    with pytest.raises(AttackError, match="PDSG"):
        PDSG.sigma(torch.randn(4, 5))


def test_pdsg_neuron_gradient_matches_a_step_by_step_reference():
    """The fused neuron with PDSG equals the plain loop with a Gaussian whose sigma is taken
    from the potentials of steps 1..t of the same forward."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 3, 4, 6, 6, generator=gen, dtype=torch.float64) + 0.6).requires_grad_()
    neuron = LIF(decay=0.5, threshold=1.0)
    neuron.record_membrane = True
    with gradient_estimator(neuron, "pdsg"):
        spikes = neuron(x)
    grad_out = torch.randn(spikes.shape, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(spikes, x, grad_out)
    sigma = PDSG.sigma(neuron.membrane - 1.0)
    step = iter(range(5))

    class Gaussian(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            ctx.save_for_backward(v)
            ctx.t = next(step)
            return (v >= 0).to(v.dtype)

        @staticmethod
        def backward(ctx, grad):
            (v,) = ctx.saved_tensors
            return grad * pdsg_derivative_(v.clone(), sigma[ctx.t])

    x_ref = x.detach().clone().requires_grad_()
    ref, _ = multistep_reference(x_ref, Gaussian.apply, decay=0.5, threshold=1.0)
    (gx_ref,) = torch.autograd.grad(ref, x_ref, grad_out)
    assert torch.equal(spikes, ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimators_leave_forward_bit_identical_and_change_only_the_gradient(
    image_victim, event_victim, name, digits_test
):
    x, _ = digits_test(16)
    events = model_layout(load_dataset("dvs-digits", "test").tensors[0][:4])
    with torch.no_grad():
        clean = image_victim(x), event_victim(events)
    with gradient_estimator(image_victim, name), gradient_estimator(event_victim, name):
        with torch.no_grad():
            swapped = image_victim(x), event_victim(events)
        assert all(type(n.surrogate).__name__ == type(get_estimator(name)).__name__
                   for n in (image_victim.sn1, image_victim.sn2, event_victim.sn1))
    assert torch.equal(clean[0], swapped[0]) and torch.equal(clean[1], swapped[1])


def test_pdsg_gradient_differs_from_the_fixed_surrogates(image_victim, digits_test):
    from shared.attack.gradient import attack_mode, loss_gradient

    x, y = digits_test(32)
    grads = {}
    for name in ESTIMATORS:
        with attack_mode(image_victim, name):
            grads[name] = loss_gradient(image_victim, x, y)
    assert grads["pdsg"].abs().sum() > 0
    for name in SURROGATES:
        assert not torch.allclose(grads["pdsg"], grads[name])


def _snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [n.surrogate for n in (model.sn1, getattr(model, "sn2", model.sn1))], model.training)


def _assert_unchanged(model: torch.nn.Module, snap: tuple) -> None:
    state, surrogates, training = snap
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    now = [n.surrogate for n in (model.sn1, getattr(model, "sn2", model.sn1))]
    assert all(a is b for a, b in zip(now, surrogates, strict=True))
    assert model.training == training
    assert all(p.grad is None for p in model.parameters())


def test_victim_is_restored_after_attacks_and_on_exceptions(
    image_victim, event_victim, digits_test, correct_event_samples
):
    snap = _snapshot(image_victim)
    image_victim.train()  # also the mode comes back as it was
    snap_train = _snapshot(image_victim)
    x, y = digits_test(8)
    pgd(image_victim, x, y, 0.1, steps=2)
    fgsm(image_victim, x, y, 0.1, grad="atan")
    _assert_unchanged(image_victim, snap_train)
    image_victim.eval()
    _assert_unchanged(image_victim, snap)
    with pytest.raises(RuntimeError, match="boom"), gradient_estimator(image_victim, "pdsg"):
        raise RuntimeError("boom")
    _assert_unchanged(image_victim, snap)
    with pytest.raises(AttackError):  # a failure inside the attack (bad label count)
        pgd(image_victim, x, y[:3], 0.1)
    _assert_unchanged(image_victim, snap)
    event_snap = _snapshot(event_victim)
    sample, label = correct_event_samples(event_victim, 1)[0]
    sda(event_victim, sample, label)
    _assert_unchanged(event_victim, event_snap)
