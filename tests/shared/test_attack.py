"""shared.attack: PDSG and the estimator swap, FGSM/PGD, SDA and its baseline, metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.attack import (
    ESTIMATORS,
    PDSG,
    AttackError,
    fgsm,
    get_estimator,
    gradient_attack_success,
    gradient_estimator,
    margin,
    pgd,
    sda,
    summarize_sparse,
    topk_baseline,
)
from shared.attack.estimators import pdsg_derivative_
from shared.data import load_dataset
from shared.snn import LIF, SURROGATES, build_model, model_layout, multistep_reference

# --- victims ----------------------------------------------------------------------------------


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for first in range(0, len(y), 64):
            idx = order[first : first + 64]
            loss = F.cross_entropy(model(model_layout(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def image_victim() -> torch.nn.Module:
    """A csnn trained briefly on the 8x8 digits (direct coding)."""
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2,
                        surrogate="sigmoid")
    _train(model, *load_dataset("digits", "train").tensors, epochs=6)
    return model


@pytest.fixture(scope="module")
def event_victim() -> torch.nn.Module:
    """An mlp trained briefly on dvs-digits event frames."""
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=2, num_classes=10, input_size=32, time_steps=8,
                        surrogate="rectangle")
    x, y = load_dataset("dvs-digits", "train").tensors
    _train(model, x[:1200], y[:1200], epochs=3)
    return model


def _digits_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset("digits", "test").tensors
    return x[:n], y[:n]


def _correct_event_samples(model: torch.nn.Module, n: int) -> list[tuple]:
    x, y = load_dataset("dvs-digits", "test").tensors
    with torch.no_grad():
        pred = model(model_layout(x[:60])).argmax(1)
    keep = (pred == y[:60]).nonzero().flatten()[:n].tolist()
    assert len(keep) == n
    return [(x[i].unsqueeze(1), y[i : i + 1]) for i in keep]


# --- PDSG ----------------------------------------------------------------------------------


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
    image_victim, event_victim, name
):
    x, _ = _digits_test(16)
    events = model_layout(load_dataset("dvs-digits", "test").tensors[0][:4])
    with torch.no_grad():
        clean = image_victim(x), event_victim(events)
    with gradient_estimator(image_victim, name), gradient_estimator(event_victim, name):
        with torch.no_grad():
            swapped = image_victim(x), event_victim(events)
        assert all(type(n.surrogate).__name__ == type(get_estimator(name)).__name__
                   for n in (image_victim.sn1, image_victim.sn2, event_victim.sn1))
    assert torch.equal(clean[0], swapped[0]) and torch.equal(clean[1], swapped[1])


def test_pdsg_gradient_differs_from_the_fixed_surrogates(image_victim):
    from shared.attack.gradient import attack_mode, loss_gradient

    x, y = _digits_test(32)
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


def test_victim_is_restored_after_attacks_and_on_exceptions(image_victim, event_victim):
    snap = _snapshot(image_victim)
    image_victim.train()  # also the mode comes back as it was
    snap_train = _snapshot(image_victim)
    x, y = _digits_test(8)
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
    sample, label = _correct_event_samples(event_victim, 1)[0]
    sda(event_victim, sample, label)
    _assert_unchanged(event_victim, event_snap)


# --- FGSM / PGD ---------------------------------------------------------------------------


def test_pgd_and_fgsm_stay_in_the_ball_and_the_valid_range(image_victim):
    x, y = _digits_test(64)
    eps = 0.1
    for x_adv in (pgd(image_victim, x, y, eps), fgsm(image_victim, x, y, eps, grad="triangle")):
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(pgd(image_victim, x, y, 0.0), x)  # eps 0 changes nothing


def test_pgd_raises_the_loss_and_fools_more_than_fgsm_or_noise(image_victim):
    x, y = _digits_test(200)

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


def test_pgd_random_start_is_reproducible_with_the_global_seed(image_victim):
    x, y = _digits_test(16)
    torch.manual_seed(5)
    a = pgd(image_victim, x, y, 0.1, steps=2)
    torch.manual_seed(5)
    b = pgd(image_victim, x, y, 0.1, steps=2)
    torch.manual_seed(6)
    c = pgd(image_victim, x, y, 0.1, steps=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_attack_success_scores_correct_inputs_only(image_victim):
    x, y = _digits_test(100)
    torch.manual_seed(0)
    summary = gradient_attack_success(image_victim, x, y, 0.15, grad="pdsg", steps=3)
    with torch.no_grad():
        correct = int((image_victim(x).argmax(1) == y).sum())
    assert summary.samples == correct and 0 < summary.success_rate <= 1
    assert summary.name == "pgd-pdsg" and summary.eps == 0.15
    assert summary.forward_passes == correct * 4 and summary.backward_passes == correct * 3
    assert summary.mean_l0 <= 64


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
def test_bad_gradient_attack_arguments_are_clear_errors(image_victim, call, needle):
    x, y = _digits_test(4)
    with pytest.raises(AttackError, match=needle) as info:
        call(image_victim, x, y)
    assert "\n" not in str(info.value)


def test_non_differentiable_victim_is_a_clear_error():
    from shared.quant import quantize

    model = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8,
                                 time_steps=2)).eval()
    x, y = _digits_test(4)
    with pytest.raises(AttackError, match="not differentiable"):
        pgd(model, x, y, 0.1)
    assert not model.training


# --- SDA ----------------------------------------------------------------------------------


def test_sda_invariants(event_victim):
    for sample, label in _correct_event_samples(event_victim, 4):
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


def test_topk_baseline_is_binary_and_misclassified(event_victim):
    results = []
    for sample, label in _correct_event_samples(event_victim, 3):
        result = topk_baseline(event_victim, sample, label)
        assert ((result.x_adv == 0) | (result.x_adv == 1)).all()
        if result.success:
            with torch.no_grad():
                assert event_victim(result.x_adv).argmax(1).item() != label.item()
        assert result.forward_passes == result.backward_passes  # no finite differences
        results.append(result)
    summary = summarize_sparse("topk", results, budgets=(10, 10_000))
    assert summary.samples == 3 and summary.budget_success[10_000] == summary.success_rate


def test_sda_failure_returns_the_clean_input():
    """A victim whose logits ignore the input: no flip can help, the attack must fail."""
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=2, num_classes=10, input_size=32, time_steps=8).eval()
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.copy_(torch.arange(10.0))  # always class 9
    sample = load_dataset("dvs-digits", "test").tensors[0][0].unsqueeze(1)
    result = sda(model, sample, torch.tensor([9]), max_iterations=3)
    assert not result.success and result.clean_correct
    assert torch.equal(result.x_adv, sample) and result.l0 == 0 and result.flips == ()
    already_wrong = sda(model, sample, torch.tensor([2]))
    assert not already_wrong.clean_correct and already_wrong.l0 == 0
    summary = summarize_sparse("sda", [result, already_wrong], budgets=(5,))
    assert summary.samples == 1 and summary.success_rate == 0.0 and math.isnan(summary.mean_l0)


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


def test_sda_takes_a_non_contiguous_sample(event_victim):
    sample, label = _correct_event_samples(event_victim, 1)[0]
    strided = torch.zeros(*sample.shape[:-1], 2 * sample.shape[-1])[..., ::2]
    strided.copy_(sample)
    assert not strided.is_contiguous()
    a, b = sda(event_victim, strided, label), sda(event_victim, sample, label)
    assert torch.equal(a.x_adv, b.x_adv) and a.flips == b.flips
