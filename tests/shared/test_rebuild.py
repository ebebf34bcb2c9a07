"""shared.rebuild.check_spec: a model spec read from a file is bounded before anything is built."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import RunConfig
from shared.errors import CheckpointError
from shared.rebuild import MAX_PARAMETERS, SPEC_LIMITS, build_from_spec, check_spec

SPEC = RunConfig.parse({"dataset": "digits", "model": "mlp"}).model_spec()


@pytest.mark.parametrize("model", ["csnn", "mlp", "resnet-mini"])
@pytest.mark.parametrize("train_mode", ["snn", "qann"])
def test_every_spec_a_run_config_makes_passes(model, train_mode):
    bits = 32 if model == "resnet-mini" else 4
    config = RunConfig.parse({"model": model, "weight-bits": bits, "train-mode": train_mode})
    assert check_spec(config.model_spec()) == config.model_spec()


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden": 20_000_000}, "hidden=20000000 is outside 1..16384"),
    ({"in_channels": 64, "input_size": 512, "hidden": 16_384}, "more than the 50,000,000"),
    ({"time_steps": True}, "time_steps=True is outside"),
    ({"num_classes": 1.5}, "num_classes=1.5 is outside"),
    ({"name": ["mlp"]}, "unknown model"),
    ({"surrogate": {"a": 1}}, "surrogate"),
    ({"weight_bits": 16}, "weight_bits=16 is not one of"),
    ({"decay": float("nan")}, "decay=nan is not a finite number"),
    ({"junk": 1}, "unknown model spec keys junk"),
])
def test_specs_out_of_bounds_are_one_line(change, needle):
    with pytest.raises(CheckpointError) as info:
        check_spec({**SPEC, **change}, "checkpoint x")
    assert needle in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(sizes=st.fixed_dictionaries({key: st.integers(-5, 2 * high)
                                    for key, (_, high) in SPEC_LIMITS.items()}))
def test_any_accepted_spec_builds_within_the_parameter_bound(sizes):
    spec = {**SPEC, **sizes}
    try:
        check_spec(spec)
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    with torch.device("meta"):
        model = build_from_spec(spec)
    assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS
