"""A node with a device profile: it trains on its device's chip and reports its modelled seconds
and joules (the reply's device-* metrics), from its own profile or the one the server sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from support import message

from client.app import (
    app,
    bound_node_config,
    device_metrics,
    device_profile,
    payload_bytes,
)
from shared import reply
from shared.config import RunConfig
from shared.fleet import DeviceProfile, device_cost
from shared.rebuild import build_from_spec
from shared.snn import federated_state

CONFIG = RunConfig.parse({"dataset": "digits", "model": "mlp", "time-steps": 1,
                          "local-epochs": 1, "batch-size": 64, "chip": "none"})
PHONE = DeviceProfile(chip={"preset": "edge-int8", "clock_mhz": 400.0}, uplink_mbps=5.0,
                      downlink_mbps=20.0, latency_ms=40.0, radio="lte")
WATCH = ("chip = { preset = 'paper-28nm-fp16', cores = 2 }\nuplink_mbps = 0.5\n"
         "downlink_mbps = 2.0\nradio = 'lte'\n")


def device_record(profile: DeviceProfile) -> ConfigRecord:
    return ConfigRecord({"name": "phone-0", "class": "phone",
                         "profile": json.dumps(profile.to_json())})


def train_message(profile: DeviceProfile | None):
    torch.manual_seed(0)
    model = build_from_spec(CONFIG.model_spec())
    records = {"arrays": ArrayRecord(federated_state(model)),
               "config": ConfigRecord({**CONFIG.to_flwr(), "server-round": 1})}
    if profile is not None:
        records["device"] = device_record(profile)
    return message(RecordDict(records), "train")


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_the_profile_comes_from_the_node_or_from_the_server(tmp_path):
    own = tmp_path / "watch.toml"
    own.write_text(WATCH)
    from_server = train_message(PHONE)
    assert device_profile(from_server, {}) == PHONE
    mine = device_profile(from_server, {"device-profile": str(own)})  # the device knows best
    assert mine.chip.cores == 2 and mine.chip.precision == "fp16"
    assert device_profile(train_message(None), {}) is None


def test_a_fleet_simulation_binds_the_partition_a_data_directory_stays():
    msg = train_message(PHONE)
    msg.content["device"]["partition-id"] = 4
    msg.content["device"]["num-partitions"] = 60
    node = {"partition-id": 17, "num-partitions": 60}
    assert bound_node_config(msg, node) == {"partition-id": 4, "num-partitions": 60}
    assert bound_node_config(msg, {"data-dir": "/data"}) == {"data-dir": "/data"}
    assert bound_node_config(train_message(PHONE), node) == node  # a deployment: no binding


def test_payload_bytes_count_arrays_and_scales_as_the_server_does():
    arrays = ArrayRecord({"w": Array(np.zeros(10, dtype=np.float32))})
    scales = ConfigRecord({"w": 0.5, "b": 0.25})
    assert payload_bytes({"arrays": arrays, "update-scales": scales}) == (
        len(arrays["w"].data) + 2 * reply.SCALAR_BYTES)


def test_device_metrics_are_the_cost_model():
    values = device_metrics(PHONE, 4e6, 0.002, 100_000, 20_000)
    cost = device_cost(PHONE, cycles=4e6, chip_j=0.002, bytes_down=100_000, bytes_up=20_000)
    assert values == {reply.DEVICE_SECONDS: cost.seconds,
                      reply.DEVICE_COMPUTE_SECONDS: cost.compute_s,
                      reply.DEVICE_ENERGY_J: cost.energy_j, reply.DEVICE_RADIO_J: cost.radio_j}
    assert set(values) <= set(reply.TRAIN_OPTIONAL)


def test_a_device_trains_on_its_chip_and_reports_its_round():
    answer = app(train_message(PHONE), context({"partition-id": 0, "num-partitions": 10}))
    assert not answer.has_error()
    metrics = answer.content["metrics"]
    compute = metrics[reply.DEVICE_COMPUTE_SECONDS]
    assert compute == pytest.approx(metrics["cycles"] / 400e6)  # its chip's cycles at its clock
    assert metrics[reply.DEVICE_SECONDS] > compute + 0.08  # + two latencies and the bytes
    assert metrics[reply.DEVICE_ENERGY_J] == pytest.approx(
        metrics["energy-j"] + metrics[reply.DEVICE_RADIO_J])
    plain = app(train_message(None), context({"partition-id": 0, "num-partitions": 10}))
    assert reply.DEVICE_SECONDS not in plain.content["metrics"]  # no profile, no device figures
