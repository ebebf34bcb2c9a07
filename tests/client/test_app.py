"""The ClientApp handlers, called through Flower's ClientApp with real Messages; the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from support import message

from client.app import app, node_data
from client.train import train_local
from shared.config import RunConfig
from shared.data import load_dataset
from shared.neurocore import ChipConfig
from shared.quant.update import decode_tensor, decode_update
from shared.rebuild import build_from_spec
from shared.snn import federated_state

CONFIG = RunConfig.parse({"dataset": "digits", "time-steps": 2, "local-epochs": 1,
                          "batch-size": 64})


def instruction(kind: str, model: torch.nn.Module, config: RunConfig = CONFIG) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord(federated_state(model)),
        "config": ConfigRecord({**config.to_flwr(), "server-round": 1}),
    })
    return message(content, kind)


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def fresh_model(config: RunConfig = CONFIG) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_from_spec(config.model_spec())


def test_train_reply_has_arrays_and_metrics():
    model = fresh_model()
    reply = app(instruction("train", model), context({"partition-id": 1, "num-partitions": 3}))
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert set(metrics) >= {"loss", "accuracy", "num-examples", "spike-density", "energy-j",
                            "cycles", "dram-bytes"}
    assert 0 < metrics["spike-density"] < 1 and 0 <= metrics["accuracy"] <= 1
    assert metrics["energy-j"] > 0 and metrics["cycles"] > 0 and metrics["dram-bytes"] > 0
    expected = len(node_data(CONFIG, {"partition-id": 1, "num-partitions": 3}, "train"))
    assert metrics["num-examples"] == expected
    before = federated_state(model)
    codes, scales = reply.content["arrays"], reply.content["update-scales"]
    assert set(codes) == set(before)  # update-bits=8: codes + a scale per tensor, BN statistics
    assert set(scales) == {k for k in before if "running" not in k}  # as float32 deltas
    assert all(codes[k].dtype == "uint8" and codes[k].shape == (before[k].numel(),)
               for k in scales)
    assert all(codes[k].dtype == "float32" for k in set(before) - set(scales))
    delta = decode_tensor(codes["conv1.weight"].numpy(), scales["conv1.weight"],
                          tuple(before["conv1.weight"].shape), 8)
    assert np.abs(delta).max() > 0  # it trained


def decoded_update(reply: Message, before: dict, bits: int) -> dict[str, np.ndarray]:
    if bits == 32:
        trained = reply.content["arrays"].to_torch_state_dict()
        return {k: (trained[k] - before[k]).numpy() for k in before}
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    shapes = {k: tuple(v.shape) for k, v in before.items()}
    return decode_update(arrays, dict(reply.content["update-scales"]), shapes, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_compressed_update_decodes_to_the_float_update_within_half_a_step(bits):
    node = context({"partition-id": 0, "num-partitions": 3})
    float_config = CONFIG.replace(update_bits=32)
    model = fresh_model()
    before = federated_state(model)
    exact = decoded_update(app(instruction("train", model, float_config), node), before, 32)
    config = CONFIG.replace(update_bits=bits)
    reply = app(instruction("train", fresh_model(), config), node)  # same seeds, same training
    approx = decoded_update(reply, before, bits)
    for name in before:
        scale = reply.content["update-scales"].get(name, 0.0)  # statistics: float32, exact
        assert np.abs(approx[name] - exact[name]).max() <= scale / 2 + 1e-6
    float_bytes = sum(len(a.data) for a in reply.content["arrays"].values())
    assert float_bytes < sum(v.numel() for v in before.values()) * bits / 8 + 200 * len(before)


def test_evaluate_reply_on_local_test_partition():
    reply = app(instruction("evaluate", fresh_model()),
                context({"partition-id": 0, "num-partitions": 2}))
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 0


def test_partitions_of_all_nodes_cover_the_training_split():
    sizes = [len(node_data(CONFIG, {"partition-id": i, "num-partitions": 4}, "train"))
             for i in range(4)]
    assert sum(sizes) == len(load_dataset("digits", "train"))


def test_node_without_partition_or_data_dir_is_a_clear_error():
    with pytest.raises(ValueError, match="--partition-id"):
        node_data(CONFIG, {}, "train")


def test_proximal_term_keeps_weights_closer_to_the_global_model():
    data = load_dataset("digits", "train")
    distances = []
    for mu in (0.0, 10.0):
        model = fresh_model()
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, data, epochs=1, batch_size=64, optimizer="sgd", lr=0.05, seed=0,
                    proximal_mu=mu)
        distances.append(sum(float((p.detach() - s).square().sum())
                             for p, s in zip(model.parameters(), start, strict=True)))
    assert distances[1] < distances[0]


def test_local_training_learns():
    data = load_dataset("digits", "train")
    model = fresh_model()
    first = train_local(model, data, epochs=1, batch_size=32, optimizer="adam", lr=0.005, seed=0)
    later = train_local(model, data, epochs=2, batch_size=32, optimizer="adam", lr=0.005, seed=1)
    assert later.loss < first.loss and later.accuracy > 0.8


def test_chip_accounts_every_local_step_and_can_be_switched_off():
    data = load_dataset("digits", "train")
    chip = ChipConfig.preset("edge-int8")
    runs = []
    for epochs in (1, 2):
        model = fresh_model()
        runs.append(train_local(model, data, epochs=epochs, batch_size=64, optimizer="sgd",
                                lr=0.05, seed=0, chip=chip))
    one, two = runs
    assert one.energy_j > 0 and one.cycles > 0 and one.dram_bytes > 0
    assert 0 < one.spike_density < 1
    assert two.energy_j > 1.5 * one.energy_j and two.cycles > 1.5 * one.cycles  # twice the steps
    assert train_local(fresh_model(), data, epochs=1, batch_size=64, optimizer="sgd", lr=0.05,
                       seed=0).spike_density is None
    off = CONFIG.replace(chip="none")
    reply = app(instruction("train", fresh_model(off), off),
                context({"partition-id": 0, "num-partitions": 3}))
    metrics = reply.content["metrics"]
    assert "energy-j" not in metrics and 0 < metrics["spike-density"] < 1
