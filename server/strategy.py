"""Strategy factory: Flower's own strategies, each extended by one mixin that records every round.

`make_strategy(config)` picks FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum, MultiKrum
or Bulyan from `flwr.serverapp.strategy`, optionally wrapped in Flower's server-side differential
privacy (`DifferentialPrivacyServerSideFixedClipping`, when `dp-clipping-norm` > 0), and subclasses
the outermost strategy with `RoundRecorder`. The mixin calls `super()` in every hook and adds two
things: bookkeeping (the global round number, continuing after a resume; replies received, failed
and rejected; bytes that travelled each way; the clients' summed chip energy, cycles and DRAM
bytes; their spike density) and update validation (`server.validation`): every train reply is
checked and decoded to full float32 weights against the global weights sent that round before the
Flower strategy (or the DP wrapper, which clips against those same weights) sees it. Rejected
replies are logged with node id and reason and left out; with fewer than `min-nodes` valid
updates, or an aggregate that is no usable model (non-finite, or outside the value bounds of
`shared.reply`: huge weights, vanishing BN variances, a step beyond `MAX_STEP`), the round leaves
the global model unchanged and the log names the replies that moved the offending tensor most.

With a fleet (`--fleet`, `server.fleet`) the mixin lets the fleet re-target the train messages
Flower sampled to the devices its selection policy picks (same count), leaves offline devices out
of evaluation, and drops replies of stragglers and devices out of energy before validation; the
round's simulated seconds and joules join its `RoundStats`.

Every reply is untrusted: evaluate replies are validated too (`server.validation.accept_evaluate`),
each accepted reply's weight is its claim capped by `server.validation.capped_weights`, and any
exception raised while handling one reply is contained to it (rejected as `internal`, logged with
its traceback); an exception inside the Flower strategy's own aggregation is logged and the round
keeps the model. No reply ends the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from server.fleet import FleetSelection
from server.validation import (
    Rejected,
    accept,
    accept_evaluate,
    as_flower_reply,
    capped_weights,
    unusable,
)
from shared.config import RunConfig
from shared.reply import DEVICE_ENERGY_J, DEVICE_SECONDS, expected_bytes

log = logging.getLogger("spikefed")

SCALAR_BYTES = 8  # a ConfigRecord number on the wire (protobuf double / 64-bit int)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array payload an ArrayRecord carries."""
    return sum(len(array.data) for array in record.values())


def reply_bytes(content: RecordDict) -> int:
    """Bytes of model update a train reply carries: its arrays (codes or weights) and the numbers of
    its ConfigRecords (the update's scales), `SCALAR_BYTES` each. Metrics are not counted."""
    arrays = sum(record_bytes(r) for r in content.array_records.values())
    scalars = sum(len(r) for r in content.config_records.values())
    return arrays + SCALAR_BYTES * scalars


@dataclass
class RoundStats:
    """What the train phase of one round saw, before server-side evaluation."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    sampled: int = 0
    clients: int = 0  # replies that were aggregated
    failed: int = 0  # error replies (client exceptions, lost nodes)
    rejected: int = 0  # updates refused by validation
    rejected_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count
    bytes_down: int = 0
    bytes_up: int = 0
    energy_j: float = 0.0  # summed over the clients' chip-accounted training steps
    cycles: int = 0
    dram_bytes: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    spike_density: float | None = None
    client_accuracy: float | None = None  # federated evaluation on the nodes' local test data
    # with a fleet (server.fleet): the devices' simulated round
    online: int | None = None  # devices online this round
    stragglers: int = 0  # replies dropped: later than round-deadline-s
    out_of_energy: int = 0  # replies dropped: the device's budget or battery ran out
    sim_seconds: float | None = None  # the round's simulated time
    sim_energy_j: float | None = None  # joules the selected devices spent (chip + radio)
    energy_by_class: dict[str, float] = field(default_factory=dict)


class RoundRecorder:
    """Mixin for a Flower strategy: validates train replies and records a `RoundStats` per round
    into `self.rounds`. The defaults accept float32 weights with no norm limit."""

    round_offset: int = 0
    on_round_start: Callable[[RoundStats], None] | None = None
    update_bits: int = 32  # the uplink format the clients were told to use (update-bits)
    max_update_norm: float = 0.0  # 0 = no limit
    min_valid: int = 1  # fewest valid updates that still change the global model (min-nodes)
    fleet: FleetSelection | None = None  # devices, selection and drop rules (server.fleet)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: dict[int, RoundStats] = {}
        self.global_arrays: dict[str, np.ndarray] | None = None

    def expect(self, arrays: ArrayRecord) -> None:
        """Remember the global weights sent for training: updates are decoded and checked against
        them (names, shapes, and the delta a compressed update adds to them)."""
        self.global_arrays = {name: array.numpy() for name, array in arrays.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        global_round = self.round_offset + server_round
        stats = self.rounds[global_round] = RoundStats(global_round)
        if self.on_round_start is not None:
            self.on_round_start(stats)
        self.expect(arrays)
        messages = list(super().configure_train(global_round, arrays, config, grid))  # type: ignore[misc]
        if self.fleet is not None:
            shapes = {name: tuple(a.shape) for name, a in self.global_arrays.items()}
            messages = self.fleet.configure_train(
                global_round, messages, list(grid.get_node_ids()), arrays,
                expected_up=expected_bytes(shapes, self.update_bits))
            stats.online = self.fleet.state.rounds[global_round].online
        stats.sampled = len(messages)
        stats.bytes_down = record_bytes(arrays) * len(messages)
        return messages

    def _reject(self, stats: RoundStats, msg: Message, reason: str, detail: str,
                phase: str = "update") -> None:
        stats.rejected += 1
        stats.rejected_reasons[reason] = stats.rejected_reasons.get(reason, 0) + 1
        log.warning("round %d: rejected the %s of node %s: %s: %s", stats.round, phase,
                    _node(msg), reason, detail)

    def _validate(
        self, global_round: int, replies: list[Message], stats: RoundStats
    ) -> list[Message]:
        """The replies that pass `server.validation.accept`, rewritten to full float32 weights
        with their capped weight."""
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: call expect(arrays) first")
        accepted: list[tuple[Message, ArrayRecord]] = []
        for msg in replies:
            try:
                weights = accept(msg.content, self.global_arrays, bits=self.update_bits,
                                 max_norm=self.max_update_norm)
            except Rejected as err:
                self._reject(stats, msg, err.reason, err.detail)
                continue
            except Exception as err:  # a bug or a case no rule foresaw: this reply only
                log.exception("round %d: failed on the update of node %s", global_round,
                              _node(msg))
                self._reject(stats, msg, "internal", f"{type(err).__name__}: {err}")
                continue
            accepted.append((msg, weights))
        return self._as_flower([m for m, _ in accepted], [w for _, w in accepted])

    def _as_flower(self, msgs: list[Message], weights: list[ArrayRecord | None]) -> list[Message]:
        """Rewrite accepted replies for Flower: common metric keys, capped example weights."""
        if not msgs:
            return []
        claims = [float(m.content["metrics"]["num-examples"]) for m in msgs]
        common = set.intersection(*(set(m.content["metrics"].keys()) for m in msgs))
        for msg, arrays, weight in zip(msgs, weights, capped_weights(claims), strict=True):
            as_flower_reply(msg.content, arrays, common, weight)
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        global_round = self.round_offset + server_round
        stats = self.rounds.setdefault(global_round, RoundStats(global_round))
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        stats.failed = len(replies) - len(ok)
        stats.bytes_up += sum(reply_bytes(m.content) for m in ok)  # rejected ones travelled too
        if self.fleet is not None:  # stragglers and devices out of energy never count
            ok, outcome = self.fleet.aggregate_train(global_round, ok)
            stats.stragglers, stats.out_of_energy = outcome.stragglers, outcome.out_of_energy
            stats.sim_seconds, stats.sim_energy_j = outcome.sim_seconds, outcome.energy_j
            stats.energy_by_class = dict(outcome.energy_by_class)
        accepted = self._validate(global_round, ok, stats)
        updates = {_node(m): m.content["arrays"] for m in accepted}  # before DP clips them
        for msg in accepted:
            metrics = msg.content["metrics"]
            stats.energy_j += float(metrics.get("energy-j", 0.0))
            stats.cycles += int(metrics.get("cycles", 0))
            stats.dram_bytes += int(metrics.get("dram-bytes", 0))
        if self.fleet is None:  # devices with their own profiles (spikefed-client --device-profile)
            device_figures(stats, accepted)
        if len(accepted) < self.min_valid:
            log.warning("round %d: %d valid updates, fewer than min-nodes=%d: the global model "
                        "stays unchanged", global_round, len(accepted), self.min_valid)
            return None, None
        try:
            arrays, metrics = super().aggregate_train(global_round, accepted)  # type: ignore[misc]
        except Exception:  # the Flower strategy failed on accepted replies: keep the model
            log.exception("round %d: the strategy's aggregation failed: the global model stays "
                          "unchanged", global_round)
            return None, None
        problem = unusable(arrays, self.global_arrays) if arrays is not None else None
        if problem:
            log.warning("round %d: the aggregate is not a usable model (%s): the global model "
                        "stays unchanged; %s", global_round, problem,
                        at_fault(updates, self.global_arrays, problem))
            arrays = None
        stats.clients = len(accepted) if arrays is not None else 0  # Bulyan may decline
        if metrics is not None:
            stats.train_loss = _maybe_float(metrics.get("loss"))
            stats.train_accuracy = _maybe_float(metrics.get("accuracy"))
            stats.spike_density = _maybe_float(metrics.get("spike-density"))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        global_round = self.round_offset + server_round
        messages = list(super().configure_evaluate(global_round, arrays, config, grid))  # type: ignore[misc]
        if self.fleet is not None:  # devices offline this round do not evaluate either
            messages = self.fleet.configure_evaluate(global_round, messages)
        if global_round in self.rounds:  # the global model travels down again for evaluation
            self.rounds[global_round].bytes_down += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate each evaluate reply (a bad one is rejected and counted like an update), leave
        out those that evaluated no examples, and let Flower average the rest."""
        global_round = self.round_offset + server_round
        stats = self.rounds.setdefault(global_round, RoundStats(global_round))
        accepted = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                if accept_evaluate(msg.content) > 0:
                    accepted.append(msg)
            except Rejected as err:
                self._reject(stats, msg, err.reason, err.detail, "evaluation")
            except Exception as err:
                log.exception("round %d: failed on the evaluation of node %s", global_round,
                              _node(msg))
                self._reject(stats, msg, "internal", f"{type(err).__name__}: {err}", "evaluation")
        accepted = self._as_flower(accepted, [None] * len(accepted))
        if not accepted:
            return None
        try:
            metrics = super().aggregate_evaluate(global_round, accepted)  # type: ignore[misc]
        except Exception:
            log.exception("round %d: aggregating the evaluations failed", global_round)
            return None
        if metrics is not None:
            stats.client_accuracy = _maybe_float(metrics.get("accuracy"))
        return metrics


def device_figures(stats: RoundStats, accepted: list[Message]) -> None:
    """A round without a server-side fleet whose devices reported their own modelled round
    (`device-seconds`, `device-energy-j`): the slowest device's seconds and the summed joules."""
    seconds, joules = [], []
    for msg in accepted:
        metrics = msg.content["metrics"]
        if DEVICE_SECONDS in metrics and DEVICE_ENERGY_J in metrics:
            seconds.append(float(metrics[DEVICE_SECONDS]))
            joules.append(float(metrics[DEVICE_ENERGY_J]))
    if seconds:
        stats.sim_seconds, stats.sim_energy_j = max(seconds), sum(joules)


def _maybe_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _node(msg: Message) -> object:
    try:
        return msg.metadata.src_node_id
    except Exception:
        return "?"


def at_fault(
    updates: dict[object, ArrayRecord], sent: dict[str, np.ndarray] | None, problem: str
) -> str:
    """Names the replies that moved the tensor named in `problem` most (largest |change|), for
    the log of a round whose aggregate broke the bounds."""
    name = problem.split(":")[0].split(" ")[0]
    if sent is None or name not in sent:
        return f"accepted replies from nodes {sorted(updates, key=str)}"
    moved = {}
    for node, arrays in updates.items():
        if name in arrays:
            delta = arrays[name].numpy().astype(np.float64) - sent[name]
            moved[node] = float(np.abs(delta).max()) if delta.size else 0.0
    ranked = sorted(moved.items(), key=lambda item: -item[1])[:3]
    nodes = ", ".join(f"node {node} ({value:.3g})" for node, value in ranked)
    return f"largest changes of {name}: {nodes}"


def sample_size(config: RunConfig) -> int:
    """Nodes sampled for training each round (Flower's rule, with `min-clients` nodes connected)."""
    min_nodes = min(config.min_nodes, config.min_clients)
    return max(int(config.min_clients * config.fraction_train), min_nodes)


def _base(config: RunConfig) -> tuple[type[Strategy], dict]:
    f = config.krum_malicious
    match config.strategy:
        case "fedavg":
            return FedAvg, {}
        case "fedprox":
            return FedProx, {"proximal_mu": config.proximal_mu}
        case "fedadam":
            return FedAdam, {"eta": config.server_lr, "eta_l": config.lr}
        case "fedmedian":
            return FedMedian, {}
        case "fedtrimmedavg":
            return FedTrimmedAvg, {"beta": config.trimmed_beta}
        case "krum":
            return Krum, {"num_malicious_nodes": f}
        case "multikrum":  # average the n - f best-scored updates
            select = max(1, sample_size(config) - f)
            return MultiKrum, {"num_malicious_nodes": f, "num_nodes_to_select": select}
        case "bulyan":
            return Bulyan, {"num_malicious_nodes": f}
    raise ValueError(f"unknown strategy {config.strategy!r}")


def privacy_summary(config: RunConfig) -> dict[str, Any] | None:
    """The differential-privacy parameters of a run (None without DP), for summary.json. Epsilon is
    not accounted: Flower's accountant needs the `flwr[dp]` extra (dp-accounting)."""
    if config.dp_clipping_norm == 0:
        return None
    sampled = sample_size(config)
    return {
        "mechanism": "gaussian, server-side fixed clipping (Flower)",
        "noise_multiplier": config.dp_noise_multiplier,
        "clipping_norm": config.dp_clipping_norm,
        "num_sampled_clients": sampled,
        "noise_stdev": config.dp_noise_multiplier * config.dp_clipping_norm / sampled,
        "rounds": config.num_server_rounds,
        "epsilon": None,
    }


def make_strategy(config: RunConfig, *, round_offset: int = 0,
                  fleet: FleetSelection | None = None) -> RoundRecorder:
    """The configured Flower strategy with validation and round recording: waits for
    `min-clients` nodes, then samples `fraction-train` of them (at least `min-nodes`) each round;
    with a `fleet`, that many devices are picked by its selection policy instead."""
    base, kwargs = _base(config)
    num_nodes = config.min_clients
    min_nodes = min(config.min_nodes, num_nodes)
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes if config.fraction_evaluate > 0 else 0,
        "min_available_nodes": num_nodes,
    }
    if config.dp_clipping_norm > 0:
        inner = base(**common, **kwargs)
        dp = DifferentialPrivacyServerSideFixedClipping
        cls = type(f"Recorded{dp.__name__}", (RoundRecorder, dp), {})
        strategy = cls(inner, noise_multiplier=config.dp_noise_multiplier,
                       clipping_norm=config.dp_clipping_norm,
                       num_sampled_clients=sample_size(config))
    else:
        cls = type(f"Recorded{base.__name__}", (RoundRecorder, base), {})
        strategy = cls(**common, **kwargs)
    strategy.round_offset = round_offset
    strategy.update_bits = config.update_bits
    strategy.max_update_norm = config.max_update_norm
    strategy.min_valid = min_nodes
    strategy.fleet = fleet
    return strategy
