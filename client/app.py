"""The Flower ClientApp: one edge node training the global SNN on its own data.

Every message carries the global weights ("arrays") and the server's resolved run config ("config"),
so the node needs nothing but its node config: `partition-id` + `num-partitions` (simulation and
partitioned deployments) or `data-dir` (a device with its own local dataset). A train reply carries
the update compressed to `update-bits` integer codes (`update_records`) and a MetricRecord.

A node that is a device with a profile (`shared.fleet`) trains and accounts on that device's chip
and reports its modelled round (`device_metrics`: simulated seconds and joules of compute and of
the bytes it received and sent) in the reply's `device-*` metrics. The profile is the node's own
(node config `device-profile`, a file, with `device-name` for a fleet file: `spikefed-client
--device-profile`) or, in a fleet run, the one the server sends in the "device" record.
"""

from __future__ import annotations

import functools
import json

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

from client.train import train_local
from shared import reply
from shared.config import RunConfig
from shared.data import load_dataset, partition_indices
from shared.fleet import DeviceProfile, device_cost, load_profile, train_precision_for
from shared.neurocore import ChipConfig
from shared.rebuild import build_from_spec
from shared.snn import (
    evaluate_model,
    federated_state,
    load_federated_state,
    model_layout,
    spike_density,
)

app = ClientApp()

DENSITY_SAMPLES = 256  # samples used to measure the trained model's spike density


def node_data(config: RunConfig, node_config: dict, split: str) -> TensorDataset:
    """This node's share of `split`: its local directory, or its partition of the built-in data."""
    if node_config.get("data-dir"):
        return load_dataset(config.dataset, split, data_dir=str(node_config["data-dir"]),
                            framing=config.framing())
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}; start the node with --partition-id/--num-partitions "
            "or --data-dir"
        ) from None
    full = load_dataset(config.dataset, split, data_dir=config.data_dir or None,
                        framing=config.framing())
    x, y = full.tensors
    idx = partition_indices(
        y,
        num_partitions,
        partition_id,
        scheme=config.partitioning,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
    )
    idx = torch.as_tensor(idx)
    return TensorDataset(x[idx], y[idx])


def _setup(msg: Message) -> tuple[RunConfig, torch.nn.Module, int, dict[str, torch.Tensor]]:
    raw = dict(msg.content[reply.CONFIG])
    server_round = int(raw.pop("server-round", 0))
    config = RunConfig.parse(raw)
    model = build_from_spec(config.model_spec())
    received = msg.content[reply.ARRAYS].to_torch_state_dict()
    load_federated_state(model, received)
    return config, model, server_round, received


def update_records(
    state: dict[str, torch.Tensor], received: dict[str, torch.Tensor], bits: int
) -> dict[str, ArrayRecord | ConfigRecord]:
    """The reply's update records for the trained `state` (format: `shared.reply`)."""
    arrays, scales = reply.encode(state, received, bits)
    records: dict[str, ArrayRecord | ConfigRecord] = {
        reply.ARRAYS: ArrayRecord({name: Array(value) for name, value in arrays.items()})
    }
    if scales is not None:
        records[reply.SCALES] = ConfigRecord(scales)
    return records


@functools.lru_cache(maxsize=4)
def _own_profile(path: str, name: str) -> DeviceProfile:
    return load_profile(path, name or None)[1]


def device_profile(msg: Message, node_config: dict) -> DeviceProfile | None:
    """This node's device: its own profile (node config `device-profile`) or the one the server
    sent with the instruction (a fleet run); None when it has neither."""
    path = node_config.get("device-profile")
    if path:
        return _own_profile(str(path), str(node_config.get("device-name", "")))
    record = msg.content.get(reply.DEVICE)
    if record is None:
        return None
    return DeviceProfile.model_validate(json.loads(str(record["profile"])))


def payload_bytes(records: dict) -> int:
    """Bytes of model payload in `records`: array data, and 8 per number of a ConfigRecord (the
    same count as the server's `server.strategy.reply_bytes`)."""
    total = 0
    for record in records.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            total += reply.SCALAR_BYTES * len(record)
    return total


def device_metrics(profile: DeviceProfile, cycles: float, chip_j: float, bytes_down: int,
                   bytes_up: int) -> dict[str, float]:
    """The reply's `device-*` metrics: the device's modelled round (`shared.fleet.device_cost`)."""
    cost = device_cost(profile, cycles=cycles, chip_j=chip_j, bytes_down=bytes_down,
                       bytes_up=bytes_up)
    return {reply.DEVICE_SECONDS: cost.seconds, reply.DEVICE_COMPUTE_SECONDS: cost.compute_s,
            reply.DEVICE_ENERGY_J: cost.energy_j, reply.DEVICE_RADIO_J: cost.radio_j}


def bound_node_config(msg: Message, node_config: dict) -> dict:
    """The node config, with the partition a fleet simulation binds to the node's device (the
    "device" record's `partition-id`, `num-partitions`): device i always trains on partition i,
    whichever Flower node plays it. A node with its own data directory keeps it."""
    record = msg.content.get(reply.DEVICE)
    if record is None or "partition-id" not in record or "partition-id" not in node_config:
        return node_config
    return {**node_config, "partition-id": int(record["partition-id"]),
            "num-partitions": int(record["num-partitions"])}


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, model, server_round, received = _setup(msg)
    node_config = bound_node_config(msg, context.node_config)
    data = node_data(config, node_config, "train")
    node_key = int(node_config.get("partition-id", context.node_id % 1_000_003))
    node_seed = reply.node_seed(config.seed, server_round, node_key)
    torch.manual_seed(node_seed)
    chip = None
    train_precision = config.resolved_train_precision()
    device = device_profile(msg, context.node_config)
    if device is not None:  # this device's chip, in its own arithmetic unless the run says
        chip = device.chip.replace(optimizer=config.optimizer)
        train_precision = train_precision_for(chip, config.train_precision)
    elif config.chip != "none":  # every local step accounted on the simulated chip
        chip = ChipConfig.preset(config.chip, optimizer=config.optimizer)
    result = train_local(
        model,
        data,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        lr=config.lr,
        seed=node_seed,
        proximal_mu=config.proximal_mu if config.strategy == "fedprox" else 0.0,
        chip=chip,
        train_precision=train_precision,
    )
    density = result.spike_density  # over this round's training steps
    if density is None:  # no chip accounting: measure the trained model instead
        model.eval()
        x = data.tensors[0][:DENSITY_SAMPLES]
        density = spike_density(model, model_layout(x))
    values = {
        reply.LOSS: result.loss,
        reply.ACCURACY: result.accuracy,
        reply.NUM_EXAMPLES: result.num_examples,
        reply.SPIKE_DENSITY: density,
        reply.TRAIN_SECONDS: result.seconds,
    }
    if chip is not None:
        values.update({reply.ENERGY_J: result.energy_j, reply.CYCLES: result.cycles,
                       reply.DRAM_BYTES: result.dram_bytes})
    records = update_records(federated_state(model), received, config.update_bits)
    if device is not None:
        values.update(device_metrics(device, result.cycles, result.energy_j,
                                     payload_bytes({reply.ARRAYS: msg.content[reply.ARRAYS]}),
                                     payload_bytes(records)))
    return Message(RecordDict({**records, reply.METRICS: MetricRecord(values)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, model, _, _ = _setup(msg)
    data = node_data(config, bound_node_config(msg, context.node_config), "test")
    loss, accuracy = evaluate_model(model, data, config.eval_batch_size)
    metrics = MetricRecord({reply.LOSS: loss, reply.ACCURACY: accuracy,
                            reply.NUM_EXAMPLES: len(data)})
    return Message(RecordDict({reply.METRICS: metrics}), reply_to=msg)
