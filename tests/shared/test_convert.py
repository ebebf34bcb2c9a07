"""shared.convert: QC activation vs IF neuron, conversion exactness, phase 2, errors, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Subset, TensorDataset

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.convert import (
    ConvertError,
    QCActivation,
    build_ann,
    convert,
    decompose_errors,
    dual_phase_convert,
    param_groups,
    qc,
    qc_activations,
    to_qc_ann,
)
from shared.data import load_dataset
from shared.rebuild import converted_metadata, load_converted
from shared.snn import IF, spiking_neurons


def if_rate(z: torch.Tensor, theta: float, steps: int, v_init: float) -> torch.Tensor:
    """theta * N / T of one IF neuron per element of z, fed z at each of `steps` steps."""
    neuron = IF(threshold=theta, reset="subtract", v_init=v_init)
    spikes = neuron(z.unsqueeze(0).expand(steps, *z.shape).contiguous())
    return theta * (spikes.sum(0) / steps)  # the order qc() multiplies in


@settings(max_examples=300, deadline=None)
@given(
    steps=st.integers(1, 32),
    theta_units=st.integers(1, 64),  # theta = units / 16: dyadic, so every sum is exact
    z_units=st.lists(st.integers(-2048, 4096), min_size=1, max_size=64),
)
def test_if_neuron_with_half_threshold_start_is_the_qc_activation(steps, theta_units, z_units):
    theta = theta_units / 16
    z = torch.tensor(z_units, dtype=torch.float64) / 1024  # ties z T / theta + 1/2 in N occur
    assert torch.equal(if_rate(z, theta, steps, theta / 2), qc(z, theta, steps))


def test_qc_equivalence_over_random_inputs_and_floor_without_half_start():
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(20_000, generator=gen, dtype=torch.float64) * 1.4 - 0.2) * 3.0
    theta = 2.5
    floor_mismatch = []
    for steps in range(1, 33):
        assert torch.equal(if_rate(z, theta, steps, theta / 2), qc(z, theta, steps)), steps
        floor_mismatch.append((if_rate(z, theta, steps, 0.0) != qc(z, theta, steps)).double())
    assert 0.1 < float(torch.cat(floor_mismatch).mean()) < 0.5  # METHODS.md: ~18 % with v0 = 0


def test_qc_activation_training_rounding_is_noisy_and_straight_through():
    act = QCActivation(levels=4, theta=2.0, noise_p=0.1)
    z = torch.linspace(-1, 3, 20_001, requires_grad=True)
    act.train()
    torch.manual_seed(0)
    out = act(z)
    exact = qc(z.detach(), 2.0, 4)
    inside = (z.detach() > 0.3) & (z.detach() < 1.7)
    unrounded = (out.detach() != exact) & inside
    assert 0.07 < float(unrounded.sum() / inside.sum()) < 0.13  # p = 0.1 skip rounding
    out.sum().backward()
    assert torch.allclose(z.grad[inside], torch.ones(int(inside.sum())))  # STE inside (0, theta)
    assert float(z.grad[z.detach() < -0.3].abs().sum()) == 0  # rounds below 0: no gradient
    assert act.theta.grad is not None and act.theta.grad != 0
    act.eval()
    assert torch.equal(act(z.detach()), exact)


def test_to_qc_ann_copies_and_replaces_every_relu():
    ann = build_ann("resnet-mini", in_channels=1, num_classes=10, input_size=8)
    before = copy.deepcopy(ann.state_dict())
    qc_ann = to_qc_ann(ann, 3)
    assert not any(isinstance(m, nn.ReLU) for m in qc_ann.modules())
    acts = qc_activations(qc_ann)
    assert len(acts) == 7 and all(m.levels == 3 for _, m in acts)
    assert any(isinstance(m, nn.ReLU) for m in ann.modules())  # input untouched
    assert all(torch.equal(v, before[k]) for k, v in ann.state_dict().items())
    groups = param_groups(qc_ann, weight_decay=1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert groups[1]["params"] == [m.theta for _, m in qc_activations(qc_ann)]


@pytest.mark.parametrize("steps", [0, -2, 1.5])
def test_time_steps_below_one_are_refused(steps):
    ann = build_ann("mlp", in_channels=1, num_classes=10, input_size=8)
    with pytest.raises(ConvertError, match="time_steps must be an integer >= 1"):
        to_qc_ann(ann, steps)
    data = TensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10))
    with pytest.raises(ConvertError, match="time_steps"):
        dual_phase_convert(to_qc_ann(ann, 2), data, steps)


def test_unsupported_layer_is_named():
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(),
                        nn.Sequential(nn.Flatten(), nn.Sigmoid(), nn.Linear(4 * 36, 10)))
    with pytest.raises(ConvertError, match=r"layer '2\.1' \(Sigmoid\)"):
        to_qc_ann(ann, 4)
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(ConvertError, match=r"layer '2' \(MaxPool2d\)"):
        to_qc_ann(pooled, 4)
    relu_ann = build_ann("csnn", in_channels=1, num_classes=10, input_size=8)
    data = TensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10))
    with pytest.raises(ConvertError, match="layer 'act1' is a ReLU"):
        dual_phase_convert(relu_ann, data, 4)


def train(model: nn.Module, data: TensorDataset, epochs: int, seed: int = 0) -> nn.Module:
    x, y = data.tensors
    torch.manual_seed(seed)
    opt = torch.optim.Adam(param_groups(model), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for first in range(0, len(y), 32):
            idx = order[first : first + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def relu_ann(digits):
    torch.manual_seed(0)  # the initial weights
    ann = build_ann("csnn", in_channels=1, num_classes=10, input_size=8)
    return train(ann, digits[0], epochs=6)


@pytest.mark.parametrize("name", ["csnn", "mlp", "resnet-mini"])
def test_at_one_step_the_snn_predicts_what_its_qc_ann_predicts(name, digits, relu_ann):
    train_set, test_set = digits
    if name == "csnn":
        qc_ann = train(to_qc_ann(relu_ann, 1), train_set, epochs=2)
    else:  # untrained, with BN statistics of real data: same computation, any weights
        torch.manual_seed(0)
        qc_ann = to_qc_ann(build_ann(name, in_channels=1, num_classes=10, input_size=8), 1)
        with torch.no_grad():
            qc_ann.train()(train_set.tensors[0])
        qc_ann.eval()
    snn = convert(qc_ann, 1).eval()
    x = test_set.tensors[0]
    with torch.no_grad():
        ann_logits, snn_logits = qc_ann(x), snn(x)
    assert torch.equal(ann_logits.argmax(1), snn_logits.argmax(1))
    torch.testing.assert_close(snn_logits, ann_logits, atol=1e-4, rtol=1e-4)
    assert len(spiking_neurons(snn)) == len(qc_activations(qc_ann))


@pytest.fixture(scope="module")
def converted(digits, relu_ann):
    qc_ann = train(to_qc_ann(relu_ann, 4), digits[0], epochs=3)
    before = copy.deepcopy(qc_ann.state_dict())
    snn, report = dual_phase_convert(qc_ann, digits[0], 4, epochs=6)
    return qc_ann, before, snn, report


def test_dual_phase_convert_reports_every_stage_and_leaves_the_ann(converted, digits):
    qc_ann, before, snn, report = converted
    assert all(torch.equal(v, before[k]) for k, v in qc_ann.state_dict().items())
    assert list(report.accuracy) == ["qc-ann", "converted", "potential-shift",
                                     "weight-calibration", "final"]
    assert (report.calibration_samples, report.heldout_samples) == (1024, 256)
    assert [e.layer for e in report.before] == [e.layer for e in report.after]
    assert report.accuracy["final"] >= report.accuracy["converted"] - 0.01
    assert "|RMP|" in report.table()
    # phase 2 lowers the residual-potential error and the held-out KL
    rmp_before = sum(e.residual for e in report.before)
    rmp_after = sum(e.residual for e in report.after)
    assert rmp_before > 0 and rmp_after < rmp_before
    assert sum(e.kl for e in report.after) < sum(e.kl for e in report.before)
    for b in report.before:  # the first layer sees a constant current: exact, nothing to fix
        assert b.clipping >= 0 and b.quantization >= 0 and 0 <= b.outside <= 1
    assert report.before[0].residual == 0
    _, test_set = digits
    from shared.snn import evaluate_model
    assert evaluate_model(snn, test_set)[1] >= evaluate_model(qc_ann, test_set)[1] - 0.03


def test_errors_sum_to_total_and_rmp_needs_a_potential_outside_the_range(converted, digits):
    qc_ann, _, _, _ = converted
    snn = convert(qc_ann, 4).eval()  # v_init = theta / 2, before phase 2
    neurons = spiking_neurons(snn)
    seen: dict[str, tuple] = {}
    for name, neuron in neurons:
        neuron.record_membrane = True
        neuron.register_forward_pre_hook(lambda _m, a, n=name: seen.__setitem__(n, (a[0],)))
        neuron.register_forward_hook(lambda _m, _a, s, n=name: seen.__setitem__(n, seen[n] + (s,)))
    with torch.no_grad():
        snn(digits[1].tensors[0])
    rmp_somewhere = False
    for name, neuron in neurons:
        current, spikes = seen[name]
        theta, steps = neuron.threshold, 4
        count = spikes.sum(0)
        err = decompose_errors(current.mean(0), count, theta, steps)
        total = err["clipping"] + err["quantization"] + err["residual"]
        torch.testing.assert_close(total, err["total"], atol=1e-12, rtol=0)
        v_final = (neuron.membrane[-1] - theta * spikes[-1]).double()
        inside = (v_final >= -1e-5) & (v_final < theta - 1e-5)
        rmp = err["residual"].abs() > 1e-4
        # z T / theta + 1/2 within float32 rounding of an integer: the neuron (float32 sums) and
        # qc() (float64 mean) may round a tie apart while v_final sits on the boundary
        levels = current.mean(0).double() * steps / theta + 0.5
        tie = (levels - levels.round()).abs() < 1e-4
        assert float(tie.double().mean()) < 0.01  # the check below still covers > 99 %
        assert not (rmp & inside & ~tie & (count > 0) & (count < steps)).any()
        rmp_somewhere |= bool(rmp.any())
    assert rmp_somewhere


def test_small_or_subset_calibration_data_is_split_and_checkpoint_round_trips(
    converted, digits, tmp_path
):
    qc_ann = converted[0]
    subset = Subset(digits[0], range(100))
    snn, report = dual_phase_convert(qc_ann, subset, 4, epochs=1, stages=False)
    assert (report.calibration_samples, report.heldout_samples) == (80, 20)
    assert "potential-shift" not in report.accuracy
    path = save_checkpoint(tmp_path / "snn.safetensors", snn.state_dict(),
                           {"model": {"name": "csnn", "in_channels": 1, "num_classes": 10,
                                      "input_size": 8, "time_steps": 4, "train_mode": "qann"},
                            **converted_metadata(qc_ann, snn)})
    tensors, meta = load_checkpoint(path)
    fresh = to_qc_ann(build_ann("csnn", in_channels=1, num_classes=10, input_size=8), 4)
    rebuilt = load_converted(fresh, tensors, meta)
    x = digits[1].tensors[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), snn(x))


def test_converted_snn_takes_event_frames_and_works_with_the_chip_model(converted, digits):
    from shared.neurocore import ChipConfig, NeuroCore

    snn = converted[2]
    x, y = digits[1].tensors[0][:8], digits[1].tensors[1][:8]
    frames = x.unsqueeze(0).expand(4, *x.shape)  # the static image as 4 frames = direct coding
    with torch.no_grad():
        torch.testing.assert_close(snn(frames), snn(x), atol=1e-5, rtol=1e-5)
    report = NeuroCore(ChipConfig(cores=2)).profile(snn, x, y)
    layers = {row["layer"] for row in report.rows}
    assert {"layers.act1", "layers.conv2"} <= layers and report.energy_j > 0


# -- issue 22: phase 2 never makes the network worse --------------------------------------------
@pytest.fixture(scope="module")
def issue22_qc_ann(digits):
    """issue22_mlp(digits, seed, T), trained once per (seed, T) for the module."""
    trained: dict[tuple[int, int], nn.Module] = {}

    def get(seed: int, time_steps: int) -> nn.Module:
        if (seed, time_steps) not in trained:
            trained[seed, time_steps] = issue22_mlp(digits, seed, time_steps)
        return trained[seed, time_steps]

    return get


def issue22_mlp(digits, seed: int, time_steps: int) -> nn.Module:
    """Issue 22's recipe: ReLU MLP 64-128-64-10 (no BN), Adam 1e-3 40 epochs, then its QC-ANN
    fine-tuned 20 epochs with Adam 5e-4."""
    x, y = digits[0].tensors

    def fit(model: nn.Module, epochs: int, lr: float, seed: int) -> nn.Module:
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(param_groups(model), lr=lr)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for first in range(0, len(y), 64):
                idx = order[first : first + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    torch.manual_seed(seed)
    ann = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                        nn.ReLU(), nn.Linear(64, 10))
    fit(ann, 40, 1e-3, seed)
    torch.manual_seed(seed)
    return fit(to_qc_ann(ann, time_steps), 20, 5e-4, seed + time_steps)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phase2_never_ends_below_phase1_on_the_issue22_mlp(digits, issue22_qc_ann, seed):
    """Before the gate, phase 2 took these from 94.4 / 93.6 / 96.4 % (phase 1) to 91.1 / 88.3 /
    91.9 % on test (held-out: seed 1 100 % -> 89 %) while the layer-wise KL fell."""
    from shared.snn import evaluate_model

    qc_ann = issue22_qc_ann(seed, 2)
    snn, report = dual_phase_convert(qc_ann, Subset(digits[0], range(512)), 2, stages=False)
    assert report.accuracy["final"] >= report.accuracy["converted"]
    assert report.agreement["final"] >= report.agreement["converted"]
    assert report.output_kl["final"] <= report.output_kl["converted"] + 1e-9
    for entry, before, after in zip(report.calibration, report.before, report.after,
                                    strict=False):  # the readout's entry has no neuron
        assert entry["layer"] == before.layer == after.layer
        if not entry["reverted"]:
            assert after.residual <= before.residual + 1e-9, entry["layer"]
    test_set = digits[1]
    phase1 = evaluate_model(convert(qc_ann, 2).eval(), test_set)[1]
    assert evaluate_model(snn, test_set)[1] >= phase1 - 5 / len(test_set.tensors[1])


def test_a_step_that_hurts_the_network_is_reverted_and_reported(digits, issue22_qc_ann):
    """Calibration with an absurd learning rate wrecks every layer it touches: no epoch passes
    the gate, so each layer keeps its phase-1 weights and the report names the steps."""
    qc_ann = issue22_qc_ann(0, 2)
    data = Subset(digits[0], range(400))
    snn, report = dual_phase_convert(qc_ann, data, 2, lr=50.0, epochs=2, stages=False,
                                     readout=False)
    phase1 = convert(qc_ann, 2)
    calibrated = [e for e in report.calibration if any(s["step"].startswith("calibrate")
                                                       and s["kept"] for s in e["steps"])]
    assert not calibrated
    assert any(r.endswith("calibrate_1") for r in report.reverted)
    assert "steps reverted" in report.table() and "calibrate_1" in report.table()
    weights = {k: v for k, v in snn.state_dict().items() if "v_init" not in k}
    for key, value in phase1.state_dict().items():
        if key in weights:
            assert torch.equal(weights[key], value), key
    assert report.accuracy["final"] >= report.accuracy["converted"]
    assert report.output_kl["final"] <= report.output_kl["converted"] + 1e-9
