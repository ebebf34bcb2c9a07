"""shared.quant: STE, ranges, bit-exact integer engine, overflow bound, save/load, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.train import train_local
from shared.checkpoint import CheckpointError
from shared.data import load_dataset
from shared.quant import (
    QuantError,
    fake_quant_weight,
    fold_readout,
    fold_spiking,
    load_integer,
    quantize,
    save_integer,
    to_integer,
    weight_codes,
)
from shared.quant.fake import integer_neuron, round_ste, shift_floor
from shared.quant.qat import Readout, Spiking
from shared.snn import build_model, spiking_neurons


def to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def assert_bit_exact(qat, engine, x_engine: torch.Tensor, x_float: torch.Tensor) -> None:
    logits = qat.eval()(x_float).double()
    int_logits = engine(x_engine)
    assert int_logits.dtype == torch.int32
    expected = int_logits.double() * engine.output_scale
    mismatches = int((logits != expected).sum())
    assert mismatches == 0, f"{mismatches} logits differ"


def probe_inputs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random uint8 images plus saturated and structured ones."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    full = torch.full((4, *shape), 255, dtype=torch.uint8)
    zero = torch.zeros((4, *shape), dtype=torch.uint8)
    sparse = (torch.rand((n // 4, *shape), generator=gen) < 0.05).to(torch.uint8) * 255
    return torch.cat([rand, full, zero, sparse])


@pytest.fixture(scope="module")
def trained_csnn():
    torch.manual_seed(0)
    qat = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=28,
                               time_steps=4), bits=4)
    train = load_dataset("mnist-subset", "train")
    train_local(qat, train, epochs=1, batch_size=64, optimizer="adam", lr=0.003, seed=0)
    return qat.eval()


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(1)
    qat = quantize(build_model("mlp", in_channels=1, num_classes=10, input_size=8,
                               time_steps=4), bits=4)
    train_local(qat, load_dataset("digits", "train"), epochs=3, batch_size=32, optimizer="adam",
                lr=0.003, seed=0)
    return qat.eval()


def test_trained_csnn_is_bit_exact_on_test_split_and_probes(trained_csnn):
    engine = to_integer(trained_csnn)
    test = load_dataset("mnist-subset", "test")
    u8 = to_u8(test.tensors[0])
    assert_bit_exact(trained_csnn, engine, u8, u8.float() / 255)
    probes = probe_inputs(1000, (1, 28, 28), seed=3)
    assert_bit_exact(trained_csnn, engine, probes, probes.float() / 255)
    accuracy = (engine(u8).argmax(1) == test.tensors[1]).float().mean().item()
    assert accuracy > 0.85  # one epoch of 4-bit QAT already learns


def test_negative_accumulators_and_membranes_occur(trained_csnn):
    """The exactness above covered floor (not truncation) of negative values."""
    probes = probe_inputs(64, (1, 28, 28), seed=5).float() / 255
    neurons = [n for _, n in spiking_neurons(trained_csnn)]
    for n in neurons:
        n.record_membrane = True
    trained_csnn(probes)
    for n in neurons:
        n.record_membrane = False
    assert all(bool((n.membrane < 0).any()) for n in neurons)
    assert all(bool((n.membrane % 2 != 0).any()) for n in neurons)  # odd: the shift rounds


def test_trained_mlp_is_bit_exact(trained_mlp):
    engine = to_integer(trained_mlp)
    test = load_dataset("digits", "test")
    u8 = to_u8(test.tensors[0])
    assert_bit_exact(trained_mlp, engine, u8, u8.float() / 255)
    probes = probe_inputs(1000, (1, 8, 8), seed=4)
    assert_bit_exact(trained_mlp, engine, probes, probes.float() / 255)


@pytest.mark.parametrize("name", ["csnn", "mlp"])
def test_event_frames_are_bit_exact(name):
    torch.manual_seed(2)
    model = build_model(name, in_channels=2, num_classes=10, input_size=16, time_steps=8)
    qat = quantize(model, bits=4)
    events = (torch.rand(8, 64, 2, 16, 16) < 0.3).float()
    qat.train()(events)  # give BN non-trivial running statistics
    qat.train()(events * (torch.rand_like(events) < 0.5))
    engine = to_integer(qat.eval())
    assert_bit_exact(qat, engine, events.to(torch.uint8), events)
    assert_bit_exact(qat, engine, events.bool(), events)


@pytest.mark.parametrize("name", ["csnn", "mlp"])
def test_an_event_is_worth_a_full_scale_pixel(name):
    """One event frame (T = 1) and the same binary image, direct-coded with T = 1, are the
    same input to the model: training treats an event as 1.0, so must the integer path."""
    torch.manual_seed(3)
    model = build_model(name, in_channels=2, num_classes=10, input_size=16, time_steps=1)
    qat = quantize(model, bits=4)
    frames = (torch.rand(1, 32, 2, 16, 16) < 0.3).float()
    with torch.no_grad():
        for _ in range(30):  # BN running statistics of this input: the neurons fire
            qat.train()(frames)
    qat.eval()
    with torch.no_grad():
        as_events, as_image = qat(frames), qat(frames[0])
    assert (as_image.std(0) > 0).any()  # the logits depend on the input
    assert torch.equal(as_events, as_image)
    engine = to_integer(qat)
    assert torch.equal(engine(frames.to(torch.uint8)), engine(to_u8(frames[0])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**23), 2**23), min_size=1, max_size=64), st.integers(1, 8))
def test_shift_is_floor_for_ints_and_floats(values, k):
    ints = torch.tensor(values, dtype=torch.int32)
    floats = ints.float()
    expected = torch.tensor([v // 2**k for v in values], dtype=torch.int32)  # Python floors
    assert torch.equal(shift_floor(ints, k), expected)
    assert torch.equal(shift_floor(floats, k), expected.float())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_integer_neuron_same_on_int32_and_float(steps, shift, subtract, seed):
    gen = torch.Generator().manual_seed(seed)
    current = torch.randint(-3000, 3000, (steps, 5, 3), generator=gen, dtype=torch.int32)
    theta = torch.randint(1, 4000, (3,), generator=gen, dtype=torch.int32)
    v0 = torch.randint(-100, 100, (3,), generator=gen, dtype=torch.int32)
    s_int, h_int = integer_neuron(current, theta, v0, shift, subtract)
    s_flt, h_flt = integer_neuron(current.float(), theta.float(), v0.float(), shift, subtract)
    assert torch.equal(s_int.float(), s_flt) and torch.equal(h_int.float(), h_flt)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.floats(1e-4, 10.0), st.integers(0, 2**16))
def test_weight_codes_range_and_pow2_scale(bits, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, 3, 3, generator=gen) * magnitude
    codes, exponent = weight_codes(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax and torch.equal(codes, codes.round())
    assert torch.equal(exponent, exponent.round())
    # the scale is the smallest power of two that fits: one exponent less would overflow qmax
    max_abs = w.abs().flatten(1).amax(1)
    assert bool((max_abs / torch.exp2(exponent) <= qmax * (1 + 1e-6)).all())
    assert bool((max_abs / torch.exp2(exponent - 1) > qmax * (1 - 1e-6)).all())


def test_straight_through_gradients():
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    grad = torch.randn(4, 2, 3, 3)
    fake_quant_weight(w, 4).backward(grad)
    assert torch.equal(w.grad, grad)
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(9))
    qat = quantize(build_model("csnn", in_channels=1, num_classes=3, input_size=8, time_steps=2))
    image = torch.rand(2, 1, 8, 8, requires_grad=True)
    qat.train()(image).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0  # input quant is STE too


def test_folded_integers_are_in_range(trained_csnn):
    for stage in trained_csnn.stages:
        if isinstance(stage, Spiking):
            fold = fold_spiking(trained_csnn, stage)
            assert fold.codes.abs().max() <= 7
            for t in (fold.shift, fold.bias, fold.theta, fold.v_init):
                assert torch.equal(t, t.round())
            assert bool((fold.theta >= 1).all()) and bool((fold.shift >= 0).all())
            assert fold.bound < 2**24
        elif isinstance(stage, Readout):
            fold = fold_readout(trained_csnn, stage)
            assert fold.codes.abs().max() <= 7 and fold.bound < 2**31
    engine = to_integer(trained_csnn)
    assert all(not t.dtype.is_floating_point for t in engine.state_dict().values())
    assert engine.output_scale == 2.0 ** round(torch.log2(torch.tensor(engine.output_scale)).item())


def test_membrane_stays_within_static_bound(trained_csnn):
    probes = probe_inputs(200, (1, 28, 28), seed=6).float() / 255
    for stage in trained_csnn.stages:
        if isinstance(stage, Spiking):
            getattr(trained_csnn, stage.neuron).record_membrane = True
    trained_csnn(probes)
    for stage in trained_csnn.stages:
        if isinstance(stage, Spiking):
            neuron = getattr(trained_csnn, stage.neuron)
            neuron.record_membrane = False
            assert neuron.membrane.abs().max() <= fold_spiking(trained_csnn, stage).bound


def test_folding_bn_changes_no_prediction(trained_csnn):
    """The integer (BN-folded) eval path predicts what fake-quant weights + float BN predict."""
    test = load_dataset("mnist-subset", "test")
    x = to_u8(test.tensors[0]).float() / 255
    unfolded = build_model("csnn", in_channels=1, num_classes=10, input_size=28, time_steps=4)
    state = trained_csnn.state_dict()
    for name in ("conv1", "conv2", "fc"):
        state[f"{name}.weight"] = fake_quant_weight(state[f"{name}.weight"], 4).detach()
    unfolded.load_state_dict(state)
    assert torch.equal(unfolded.eval()(x).argmax(1), trained_csnn(x).argmax(1))


def test_overflow_bound_fails_export_clearly():
    qat = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8,
                               time_steps=64), bits=8)
    with torch.no_grad():
        qat.bn1.bias.fill_(1e6)  # an absurd offset: the membrane would leave 2**24
    with pytest.raises(QuantError, match="2\\*\\*24"):
        to_integer(qat.eval())


def test_save_load_round_trip(trained_csnn, tmp_path):
    engine = to_integer(trained_csnn)
    path = save_integer(engine, tmp_path / "engine.safetensors")
    loaded = load_integer(path)
    probes = probe_inputs(50, (1, 28, 28), seed=7)
    assert torch.equal(loaded(probes), engine(probes))
    assert loaded.output_scale == engine.output_scale
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError):
        load_integer(path)


def test_float_and_quantized_state_dicts_interchange():
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    qat = quantize(model)
    assert qat.state_dict().keys() == model.state_dict().keys()
    assert all(t.dtype.is_floating_point for k, t in qat.state_dict().items()
               if not k.endswith("num_batches_tracked"))
    assert type(model).__name__ == "CSNN"  # the input model is untouched
    assert not any("Q" in type(m).__name__ for m in model.modules())


def test_bad_input_is_a_clear_error():
    float_model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    with pytest.raises(QuantError, match="to_integer needs a model from"):
        to_integer(float_model)
    for bits in (1, 9, 4.0, "4"):
        with pytest.raises(QuantError, match="2..8"):
            quantize(float_model, bits=bits)
    with pytest.raises(QuantError, match="supports"):
        quantize(build_model("resnet-mini", in_channels=1, num_classes=10, input_size=8,
                             time_steps=2))
    with pytest.raises(QuantError, match="not 1 - 2\\*\\*-k"):
        quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2,
                             decay=0.6))
    engine = to_integer(quantize(float_model).eval())
    with pytest.raises(QuantError, match="uint8"):
        engine(torch.rand(2, 1, 8, 8))
