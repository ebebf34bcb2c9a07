"""client.byzantine: the fault-injecting wrapper corrupts only the chosen nodes' train updates,
and the honest ClientApp refuses the byzantine settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from support import message

from client.app import app as honest_app
from client.byzantine import app as byzantine_app
from client.byzantine import reply_delta
from shared.byzantine import FACTOR, KIND_KEY, NODES_KEY
from shared.config import ConfigError, RunConfig
from shared.rebuild import build_from_spec
from shared.snn import federated_state

CONFIG = RunConfig.parse({"dataset": "digits", "time-steps": 2, "local-epochs": 1,
                          "batch-size": 64, "chip": "none"})


def instruction(config: RunConfig, **extra) -> tuple[Message, dict]:
    torch.manual_seed(0)
    state = federated_state(build_from_spec(config.model_spec()))
    content = RecordDict({
        "arrays": ArrayRecord(state),
        "config": ConfigRecord({**config.to_flwr(), "server-round": 1, **extra}),
    })
    return message(content, "train"), state


def node(partition_id: int) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition_id, "num-partitions": 3})


def deltas(reply: Message, state: dict, bits: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply_delta(reply, state, bits).items()}


@pytest.mark.parametrize("bits", [32, 8])
def test_sign_flip_node_sends_the_reversed_boosted_update_and_others_stay_honest(bits):
    config = CONFIG.replace(update_bits=bits)
    msg, state = instruction(config)
    honest = deltas(honest_app(msg, node(0)), state, bits)
    attack = {NODES_KEY: 1, KIND_KEY: "sign-flip"}
    msg, _ = instruction(config, **attack)
    flipped = deltas(byzantine_app(msg, node(0)), state, bits)
    msg, _ = instruction(config, **attack)
    bystander = byzantine_app(msg, node(1))  # partition 1 is not among the first K=1
    msg, _ = instruction(config)
    assert np.array_equal(deltas(bystander, state, bits)["fc.weight"],
                          deltas(honest_app(msg, node(1)), state, bits)["fc.weight"])
    for name in state:
        tolerance = 1e-5 if bits == 32 else FACTOR * np.abs(honest[name]).max() / 127 + 1e-6
        assert np.abs(flipped[name] + FACTOR * honest[name]).max() <= tolerance


def test_nan_node_sends_a_non_finite_update_in_either_format():
    for bits in (8, 32):
        msg, state = instruction(CONFIG.replace(update_bits=bits),
                                 **{NODES_KEY: 2, KIND_KEY: "nan"})
        reply = byzantine_app(msg, node(1))
        assert not reply.has_error()
        if bits == 8:
            assert all(math.isnan(s) for s in reply.content["update-scales"].values())
            assert np.isnan(reply.content["arrays"]["bn1.running_var"].numpy()).all()
        else:
            assert np.isnan(reply.content["arrays"]["fc.weight"].numpy()).all()


def test_random_node_sends_noise_much_larger_than_the_update():
    msg, state = instruction(CONFIG, **{NODES_KEY: 1, KIND_KEY: "random"})
    noisy = deltas(byzantine_app(msg, node(0)), state, 8)
    msg, _ = instruction(CONFIG)
    honest = deltas(honest_app(msg, node(0)), state, 8)
    ratio = np.linalg.norm(noisy["fc.weight"]) / np.linalg.norm(honest["fc.weight"])
    assert 5 < ratio < 20  # FACTOR x the RMS, in random directions


def test_the_honest_client_refuses_byzantine_settings():
    """Flower turns the exception into an error reply: the server counts that node as failed."""
    msg, _ = instruction(CONFIG, **{NODES_KEY: 1, KIND_KEY: "nan"})
    with pytest.raises(ConfigError, match="unknown key 'byzantine-nodes'"):
        honest_app(msg, node(0))
