"""The local trainer's train-precision: int8 / fp16 training, what the chip accounts."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import TensorDataset

import client.train
from client.train import train_local
from shared.config import RunConfig
from shared.data import load_dataset
from shared.neurocore import Accountant, ChipConfig, NeuroCore
from shared.quant.integer_training import INT8_MAX, TrainPrecision, pow2_exponent
from shared.rebuild import build_from_spec
from shared.snn import federated_state

CONFIG = RunConfig.parse({"dataset": "digits", "time-steps": 2})


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_from_spec(CONFIG.model_spec())


def train(model: torch.nn.Module, precision: str, **kwargs):
    x, y = load_dataset("digits", "train").tensors
    data = TensorDataset(x[:384], y[:384])
    return train_local(model, data, epochs=1, batch_size=64, optimizer="adam", lr=0.01, seed=3,
                       train_precision=precision, **kwargs)


def test_int8_path_with_quantizers_off_reproduces_float_training_bit_for_bit(monkeypatch):
    reference = fresh_model()
    train(reference, "float")
    monkeypatch.setattr(client.train, "TrainPrecision",
                        functools.partial(TrainPrecision, quantize=False))
    for precision in ("int8", "fp16"):
        model = fresh_model()
        result = train(model, precision)
        for (name, p), q in zip(federated_state(model).items(),
                                federated_state(reference).values(), strict=True):
            assert torch.equal(p, q), name
        assert result.loss > 0


def test_int8_training_keeps_int8_shadow_weights_and_learns():
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, "int8")
    assert result.accuracy > 0.2  # digits, 10 classes, 6 steps
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
        rows = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        k = pow2_exponent(rows.abs().amax(1, keepdim=True), INT8_MAX)
        codes = rows / torch.exp2(k)  # int8 codes times one power of two per output channel
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= INT8_MAX, name


def test_fp16_training_keeps_half_precision_weights():
    model = fresh_model()
    train(model, "fp16")
    for name, p in model.named_parameters():
        assert torch.equal(p, p.half().float()), name


def test_int8_training_is_reproducible_by_seed():
    a, b = fresh_model(), fresh_model()
    train(a, "int8")
    train(b, "int8")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_chip_accounts_the_arithmetic_the_step_ran():
    edge = ChipConfig.preset("edge-int8")
    energies = {}
    for precision in ("float", "fp16", "int8"):
        model = fresh_model()
        energies[precision] = train(model, precision, chip=edge).energy_j
        acc = Accountant(edge, model, train_precision=precision)
        assert acc.config.precision == {"float": "fp32", "fp16": "fp16", "int8": "int8"}[precision]
        assert acc.config.replaced_precision == (None if precision == "int8" else "int8")
    assert energies["float"] > energies["fp16"] > energies["int8"] > 0

    model, data = fresh_model(), load_dataset("digits", "train")
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    notes = NeuroCore(edge.for_training("float")).profile(model, x, y).meta["notes"]
    said = " ".join(notes)
    assert "specifies int8" in said and "costed at fp32" in said
    agreed = NeuroCore(edge.for_training("int8")).profile(model, x, y)
    assert "specifies" not in " ".join(agreed.meta["notes"])
    assert agreed.meta["train_precision"] == "int8" and agreed.meta["precision"] == "int8"


@pytest.mark.parametrize("chip", ["edge-int8", "paper-28nm-fp16", "none"])
def test_default_train_precision_is_what_the_chip_preset_computes(chip):
    config = CONFIG.replace(chip=chip)
    assert config.train_precision == "auto"
    precision = config.resolved_train_precision()
    if chip == "none":
        assert precision == "float"
        return
    accounted = ChipConfig.preset(chip).for_training(precision)
    assert accounted.replaced_precision is None  # the default claims nothing it did not run
    assert accounted.precision == ChipConfig.preset(chip).precision
    assert CONFIG.replace(chip=chip, train_precision="float").resolved_train_precision() == "float"
