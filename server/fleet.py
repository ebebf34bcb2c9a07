"""The fleet on Flower's strategy hooks: which devices train each round, and which replies count.

`FleetSelection` is used by `server.strategy.RoundRecorder` when the run has a fleet
(`--fleet FILE`, run-config key `fleet`); the model of devices, costs and policies is
`shared.fleet` (pure). Per round:

- `configure_train`: the Flower strategy builds its train messages as usual (its sampling sets how
  many devices a round trains, `fraction-train`, and its hooks add their config: FedProx's
  proximal-mu, ...). The fleet then re-targets that many messages to the devices its policy
  (`selection`) picks among the nodes online this round, and adds to each message a "device"
  ConfigRecord (`shared.reply.DEVICE`) naming the node's device and its profile, so the client
  trains and accounts on that device's chip.
- `configure_evaluate`: messages to devices offline this round are left out.
- `aggregate_train`: each reply's device figures (the reply's `device-*` metrics, or, when a reply
  lacks them, the server's own from the profile, the reply's chip cycles and joules and the bytes
  that travelled) decide whether it counts: out-of-energy and straggling replies are dropped before
  validation, as a deployment would never have received them in time.

Nodes are given devices in the order the server first sees them (sorted node ids): node i gets
device i of the fleet. Nodes beyond the fleet's size have no device and are never selected
(logged once).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from shared import reply
from shared.fleet import DeviceCost, FleetState, RoundOutcome, device_cost, local_steps

log = logging.getLogger("spikefed")


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def content_bytes_up(content: RecordDict) -> int:
    """Bytes of a train reply's update: arrays, plus 8 per update scale (as `server.strategy`)."""
    arrays = sum(record_bytes(r) for r in content.array_records.values())
    scalars = sum(len(r) for r in content.config_records.values())
    return arrays + reply.SCALAR_BYTES * scalars


class FleetSelection:
    """A fleet's devices mapped onto Flower nodes, with the selection and drop rules."""

    def __init__(self, state: FleetState, *, bind_partitions: bool = False) -> None:
        """`bind_partitions` (a simulation): device i trains on data partition i of the fleet's
        size, whichever Flower node (random ids) plays it, so a rerun pairs devices and data the
        same way."""
        self.state = state
        self.bind_partitions = bind_partitions
        self.node_device: dict[int, int] = {}
        self._next = 0
        self._warned: set[int] = set()
        self._online: dict[int, set[int]] = {}  # round -> online node ids
        self._bytes_down: dict[int, int] = {}  # round -> bytes of the global model sent
        self._expected_up = 0  # bytes of an update, from the last replies (estimate)

    # -- node <-> device -------------------------------------------------------------------------
    def assign(self, node_ids: Iterable[int]) -> None:
        for node in sorted(node_ids):
            if node in self.node_device:
                continue
            if self._next < len(self.state.fleet):
                self.node_device[node] = self._next
                self._next += 1
            elif node not in self._warned:
                self._warned.add(node)
                log.warning("node %s has no device: the fleet has %d devices, all assigned; it "
                            "is never selected", node, len(self.state.fleet))

    def device_record(self, index: int) -> ConfigRecord:
        device = self.state.fleet.devices[index]
        record = ConfigRecord({"name": device.name, "class": device.klass,
                               "profile": json.dumps(device.profile.to_json())})
        if self.bind_partitions:
            record["partition-id"] = index
            record["num-partitions"] = len(self.state.fleet)
        return record

    def message(self, content: RecordDict, node: int, message_type: str) -> Message:
        """A message of `content` to `node`, with the "device" record of the node's device."""
        records = dict(content.items())
        records[reply.DEVICE] = self.device_record(self.node_device[node])
        return Message(content=RecordDict(records), message_type=message_type, dst_node_id=node)

    # -- the hooks ---------------------------------------------------------------------------------
    def configure_train(self, round_: int, messages: list[Message], node_ids: list[int],
                        arrays: ArrayRecord, expected_up: int) -> list[Message]:
        """Re-target the strategy's `messages` (as many as it sampled) to the devices the policy
        picks among the online ones, each with its "device" record."""
        if not messages:
            return messages
        self.assign(node_ids)
        connected = [n for n in node_ids if n in self.node_device]
        device_node = {self.node_device[n]: n for n in connected}
        self.state.recharge()
        online = self.state.online(round_, sorted(device_node))
        self._online[round_] = {device_node[i] for i in online}
        down = record_bytes(arrays)
        self._bytes_down[round_] = down
        up = self._expected_up or expected_up
        chosen = self.state.select(round_, online, len(messages), bytes_down=down, bytes_up=up)
        self.state.mark_selected(round_, chosen)
        content = messages[0].content  # Flower sends every node the same records
        out = [self.message(content, device_node[i], MessageType.TRAIN) for i in chosen]
        self.state.rounds[round_] = RoundOutcome(online=len(online), selected=len(out))
        log.info("round %d: %d devices online, selected %d (%s)", round_, len(online), len(out),
                 self.state.policy)
        return out

    def configure_evaluate(self, round_: int, messages: list[Message]) -> list[Message]:
        """The evaluate messages to devices online this round, each with its device record."""
        online = self._online.get(round_)
        if online is not None:
            messages = [m for m in messages if m.metadata.dst_node_id in online]
        return [self.message(m.content, m.metadata.dst_node_id, MessageType.EVALUATE)
                if m.metadata.dst_node_id in self.node_device else m for m in messages]

    def reply_cost(self, index: int, msg: Message, round_: int) -> DeviceCost | None:
        """The device's figures for its reply: its own `device-*` metrics when it sent them, else
        the server's model from the profile (None when neither is possible)."""
        metrics = msg.content.metric_records.get(reply.METRICS)
        if metrics is None:
            return None
        values = {k: metrics.get(k) for k in (reply.DEVICE_COMPUTE_SECONDS, reply.DEVICE_SECONDS,
                                              reply.DEVICE_RADIO_J, reply.DEVICE_ENERGY_J)}
        if all(_finite(v) for v in values.values()):
            compute = float(values[reply.DEVICE_COMPUTE_SECONDS])
            radio = float(values[reply.DEVICE_RADIO_J])
            return DeviceCost(compute, max(0.0, float(values[reply.DEVICE_SECONDS]) - compute),
                              max(0.0, float(values[reply.DEVICE_ENERGY_J]) - radio), radio)
        cycles, chip_j = metrics.get(reply.CYCLES), metrics.get(reply.ENERGY_J)
        if not (_finite(cycles) and _finite(chip_j)):
            return None
        profile = self.state.fleet.devices[index].profile
        return device_cost(profile, cycles=float(cycles), chip_j=float(chip_j),
                           bytes_down=self._bytes_down.get(round_, 0),
                           bytes_up=content_bytes_up(msg.content))

    def aggregate_train(self, round_: int, replies: list[Message]) -> tuple[list[Message],
                                                                           RoundOutcome]:
        """The replies that count (in time, within energy), and the round's outcome. Error
        replies are kept for the caller to count as failed."""
        outcome = self.state.rounds.setdefault(round_, RoundOutcome())
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            node = msg.metadata.src_node_id
            index = self.node_device.get(node)
            cost = self.reply_cost(index, msg, round_) if index is not None else None
            if index is None or cost is None:
                outcome.accepted += 1  # nothing to decide by: validation judges it
                kept.append(msg)
                continue
            self._expected_up = content_bytes_up(msg.content)
            metrics = msg.content.metric_records.get(reply.METRICS)
            examples = metrics.get(reply.NUM_EXAMPLES) if metrics is not None else None
            examples = int(examples) if _finite(examples) and examples >= 1 else None
            steps = (local_steps(examples, self.state.batch_size, self.state.epochs)
                     if examples else None)
            verdict, spent = self.state.settle(index, cost, examples=examples, steps=steps)
            device = self.state.fleet.devices[index]
            outcome.devices.append((device.name, verdict, cost.seconds, spent))
            outcome.energy_j += spent
            outcome.energy_by_class[device.klass] = (
                outcome.energy_by_class.get(device.klass, 0.0) + spent)
            if verdict == "accepted":
                outcome.accepted += 1
                kept.append(msg)
            elif verdict == "straggler":
                outcome.stragglers += 1
                log.info("round %d: %s (node %s) is a straggler: %.3g s > deadline %.3g s",
                         round_, device.name, node, cost.seconds, self.state.deadline_s)
            else:
                outcome.out_of_energy += 1
                log.info("round %d: %s (node %s) ran out of energy: needs %.3g J", round_,
                         device.name, node, cost.energy_j)
        self.state.close_round(round_, outcome)
        return kept, outcome


def _finite(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)
