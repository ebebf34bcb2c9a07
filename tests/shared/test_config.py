"""shared.config: defaults in sync with pyproject.toml, and one-line errors for bad values."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import MAX_SEED, ConfigError, RunConfig
from shared.rebuild import build_from_spec

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_equals_the_model_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flwr()


def test_parse_round_trip_and_overrides():
    config = RunConfig.parse({"time-steps": 8, "dataset": "digits"}, lr=0.01)
    assert (config.time_steps, config.dataset, config.lr) == (8, "digits", 0.01)
    assert RunConfig.parse(config.to_flwr()) == config
    assert config.replace(seed=3).seed == 3


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"time-step": 4}, "unknown key 'time-step' (did you mean 'time-steps'?"),
        ({"time-steps": -3}, "time-steps=-3 is not allowed: Input should be greater than"),
        ({"strategy": "fedbest"}, "strategy='fedbest' is not allowed: Input should be 'fedavg'"),
        ({"dataset": "imagenet"}, "dataset='imagenet' is not allowed"),
        ({"lr": "fast"}, "lr='fast' is not allowed"),
    ],
)
def test_bad_config_is_one_clear_line(raw, needle):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse(raw)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_model_spec_follows_the_dataset():
    spec = RunConfig.parse({"dataset": "digits", "model": "mlp"}).model_spec()
    assert spec == {"name": "mlp", "in_channels": 1, "num_classes": 10, "input_size": 8,
                    "time_steps": 4, "neuron": "lif", "surrogate": "atan", "weight_bits": 4}
    events = RunConfig.parse({"dataset": "dvs-digits", "time-steps": 2}).model_spec()
    assert (events["in_channels"], events["input_size"], events["time_steps"]) == (2, 32, 8)


def test_weight_bits_selects_quantization_aware_or_float_models():
    from shared.quant import QuantizedMixin

    quantized = build_from_spec(RunConfig.parse({"dataset": "digits"}).model_spec())
    assert isinstance(quantized, QuantizedMixin) and quantized.conv1.bits == 4
    float_model = build_from_spec(RunConfig.parse({"weight-bits": 32}).model_spec())
    assert not isinstance(float_model, QuantizedMixin)
    with pytest.raises(ConfigError, match="weight-bits=16 is not allowed"):
        RunConfig.parse({"weight-bits": 16})
    with pytest.raises(ConfigError, match="resnet-mini trains in float only"):
        RunConfig.parse({"model": "resnet-mini"})


# -- values with no meaning at their edges are refused at start, naming the key ---------------

FLOAT_KEYS = [name.replace("_", "-") for name, f in RunConfig.model_fields.items()
              if f.annotation in (float, "float")]
INT_KEYS = [name.replace("_", "-") for name, f in RunConfig.model_fields.items()
            if f.annotation in (int, "int")]


def test_every_number_key_is_covered():
    assert {"round-timeout", "max-update-norm", "dp-noise-multiplier", "lr"} <= set(FLOAT_KEYS)
    assert {"seed", "num-server-rounds", "min-clients"} <= set(INT_KEYS)


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from(FLOAT_KEYS),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan"), True, False]))
def test_no_float_key_takes_an_infinity_nan_or_boolean(key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse({key: value})
    assert f"{key}=" in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from(INT_KEYS), value=st.sampled_from([True, False, 1.0, 2.5, "3"]))
def test_no_int_key_takes_a_boolean_a_float_or_text(key, value):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse({key: value})
    assert f"{key}=" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=-(2**70), max_value=2**70))
def test_seeds_are_accepted_exactly_in_the_range_every_generator_takes(seed):
    import torch

    from shared.reply import node_seed

    if 0 <= seed <= MAX_SEED:
        config = RunConfig.parse({"seed": seed})
        torch.Generator().manual_seed(node_seed(config.seed, 10_000, 2**31))  # in range
    else:
        with pytest.raises(ConfigError, match="seed="):
            RunConfig.parse({"seed": seed})
