"""shared.snn: the fused multi-step neuron against the plain loop, surrogates, and the model zoo."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.snn import (
    IF,
    LIF,
    SURROGATES,
    build_model,
    federated_state,
    load_federated_state,
    multistep_reference,
    spike_density,
)

NEURON_CASES = [
    (decay, reset, detach, name)
    for decay in (1.0, 0.5, 0.875)
    for reset in ("subtract", "zero")
    for detach in (True, False)
    for name in SURROGATES
]


@pytest.mark.parametrize(("decay", "reset", "detach", "name"), NEURON_CASES)
def test_fused_neuron_matches_reference_loop(decay, reset, detach, name):
    gen = torch.Generator().manual_seed(hash((decay, reset, detach, name)) % 2**31)
    x = (torch.randn(7, 4, 3, 5, generator=gen) * 1.5).requires_grad_()
    v0 = (torch.randn(3, 5, generator=gen) * 0.5).requires_grad_()
    neuron = LIF(decay=decay, threshold=0.8, reset=reset, v_init=v0, surrogate=name,
                 detach_reset=detach)
    neuron.record_membrane = True
    spikes = neuron(x)
    grad_out = torch.randn(spikes.shape, generator=gen)
    gx, gv = torch.autograd.grad(spikes, (x, v0), grad_out)

    x_ref = x.detach().clone().requires_grad_()
    ref_spikes, ref_membrane = multistep_reference(
        x_ref, neuron.surrogate, decay=decay, threshold=0.8, reset=reset, v_init=v0,
        detach_reset=detach,
    )
    gx_ref, gv_ref = torch.autograd.grad(ref_spikes, (x_ref, v0), grad_out)

    assert spikes.sum() > 0 and (spikes == 0).any()  # both regimes exercised
    assert torch.equal(spikes, ref_spikes)  # bit-identical forward
    assert torch.equal(neuron.membrane, ref_membrane)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gv, gv_ref, atol=1e-6, rtol=0)


def test_membrane_is_kept_only_when_asked():
    neuron = IF()
    neuron(torch.rand(3, 2, 4))
    assert neuron.membrane is None
    neuron.record_membrane = True
    neuron(torch.rand(3, 2, 4))
    assert neuron.membrane is not None and neuron.membrane.shape == (3, 2, 4)


def test_if_neuron_dynamics_by_hand():
    # threshold 1, reset by subtraction, constant input 0.4: potentials 0.4, 0.8, 1.2 -> fire, 0.6
    neuron = IF(threshold=1.0)
    neuron.record_membrane = True
    spikes = neuron(torch.full((4, 1), 0.4, dtype=torch.float64))
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(neuron.membrane.flatten(),
                               torch.tensor([0.4, 0.8, 1.2, 0.6], dtype=torch.float64))


def test_lif_reset_to_zero_by_hand():
    neuron = LIF(decay=0.5, threshold=1.0, reset="zero")
    neuron.record_membrane = True
    spikes = neuron(torch.tensor([[1.5], [0.8], [0.8]]))
    assert spikes.flatten().tolist() == [1.0, 0.0, 1.0]  # 1.5 fire -> 0; 0.8; 0.4+0.8=1.2 fire
    torch.testing.assert_close(neuron.membrane.flatten(), torch.tensor([1.5, 0.8, 1.2]))


@pytest.mark.parametrize("name", list(SURROGATES))
def test_surrogate_forward_is_heaviside_and_grad_integrates_to_one(name):
    surrogate = SURROGATES[name]()
    x = torch.linspace(-40, 40, 400_001, dtype=torch.float64, requires_grad=True)
    spikes = surrogate(x)
    assert torch.equal(spikes, (x >= 0).to(x.dtype))
    (g,) = torch.autograd.grad(spikes.sum(), x)
    assert torch.equal(g, surrogate.grad(x.detach()))
    integral = torch.trapezoid(g, x.detach()).item()
    # atan's tails decay like 1/x^2: the window [-40, 40] holds all but ~0.5 %
    assert integral == pytest.approx(1.0, abs=1e-2)
    assert g[200_000] == g.max()  # peaks at the threshold (x = 0)


def test_surrogate_grad_does_not_modify_its_input():
    x = torch.linspace(-2, 2, 11)
    before = x.clone()
    for cls in SURROGATES.values():
        cls().grad(x)
    assert torch.equal(x, before)


def test_callable_surrogate_is_accepted():
    calls = []

    class Fast(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x >= 0).float()

        @staticmethod
        def backward(ctx, grad):
            calls.append(1)
            (x,) = ctx.saved_tensors
            return grad / (1 + x.abs()) ** 2

    model = build_model("mlp", in_channels=1, num_classes=3, input_size=4, time_steps=3,
                        surrogate=Fast.apply)
    model(torch.rand(5, 1, 4, 4)).sum().backward()
    assert calls  # the custom backward ran


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown surrogate 'nope'"):
        LIF(surrogate="nope")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", in_channels=1, num_classes=10, input_size=28, time_steps=4)


@pytest.mark.parametrize("name", ["csnn", "mlp", "resnet-mini"])
def test_models_direct_and_event_inputs(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, num_classes=10, input_size=32, time_steps=3)
    logits = model(torch.rand(4, 2, 32, 32))
    assert logits.shape == (4, 10)
    events = (torch.rand(3, 4, 2, 32, 32) < 0.2).float()
    out = model(events)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    synaptic = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert synaptic


def test_direct_coding_equals_repeated_frames():
    """Computing the head once is exact: same as feeding the image as T identical frames."""
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=28, time_steps=4).eval()
    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(model(x), model(x.unsqueeze(0).expand(4, -1, -1, -1, -1)))


def test_csnn_shapes_match_reference_net():
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=28, time_steps=4)
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 16)
    assert (model.conv2.in_channels, model.conv2.out_channels) == (16, 32)
    assert model.fc.in_features == 32 * 7 * 7
    assert model.sn1.decay == 0.5
    assert sum(p.numel() for p in model.parameters()) == 144 + 32 + 4608 + 64 + 15690


def test_federated_state_round_trip():
    a = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    b = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    state = federated_state(a)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    load_federated_state(b, state)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    with pytest.raises(ValueError, match="does not fit"):
        load_federated_state(b, {k: v for k, v in state.items() if k != "fc.weight"})


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.floats(0.0, 1.0))
def test_spike_density_is_a_fraction(time_steps, scale):
    model = build_model("mlp", in_channels=1, num_classes=4, input_size=4, time_steps=time_steps)
    density = spike_density(model.eval(), torch.rand(3, 1, 4, 4) * scale)
    assert 0.0 <= density <= 1.0 and not math.isnan(density)


def test_snn_and_data_do_not_import_flwr():
    code = "import sys, shared.snn, shared.data, shared.config, shared.checkpoint; " \
           "print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fast_avg_pool_equals_torch_avg_pool():
    from shared.snn.models import AvgPool2x2

    x = torch.rand(3, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = AvgPool2x2()(x), torch.nn.functional.avg_pool2d(x_ref, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    odd = torch.rand(1, 1, 5, 5)
    torch.testing.assert_close(AvgPool2x2()(odd), torch.nn.functional.avg_pool2d(odd, 2))
