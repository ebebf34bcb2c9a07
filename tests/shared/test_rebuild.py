"""shared.rebuild.check_spec: a model spec read from a file is bounded before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.config import RunConfig
from shared.errors import CheckpointError
from shared.rebuild import (
    MAX_PARAMETERS,
    SPEC_LIMITS,
    GlobalModel,
    build_from_spec,
    check_spec,
)

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


def _global_model(config: dict) -> GlobalModel:
    return GlobalModel(Path("ckpt/round_1.safetensors"), torch.nn.Identity(), {},
                       {"config": config}, {})


def test_framing_is_the_runs_and_defaults_for_older_runs():
    from shared.data import Framing

    run = RunConfig.parse({"event-frames": 4, "event-framing": "count", "event-size": 16})
    assert _global_model(run.to_flwr()).framing() == run.framing() == Framing(4, "count", 16)
    assert _global_model({}).framing() == RunConfig().framing()


@given(st.dictionaries(st.sampled_from(["event-frames", "event-framing", "event-size"]),
                       st.one_of(st.integers(), st.text(max_size=8), st.none(), st.floats())))
@example({"event-frames": float("inf")})
@settings(max_examples=60, deadline=None)
def test_hostile_framing_in_a_checkpoint_is_a_checkpoint_error(config):
    try:
        _global_model(config).framing()
    except CheckpointError as e:
        assert "\n" not in str(e)
