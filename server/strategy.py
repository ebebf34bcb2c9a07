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
updates, or an aggregate that is no usable model (non-finite, negative BN variances), the round
leaves the global model unchanged.
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

from server.validation import Rejected, accept, as_flower_reply, unusable
from shared.config import RunConfig

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


class RoundRecorder:
    """Mixin for a Flower strategy: validates train replies and records a `RoundStats` per round
    into `self.rounds`. The defaults accept float32 weights with no norm limit."""

    round_offset: int = 0
    on_round_start: Callable[[RoundStats], None] | None = None
    update_bits: int = 32  # the uplink format the clients were told to use (update-bits)
    max_update_norm: float = 0.0  # 0 = no limit
    min_valid: int = 1  # fewest valid updates that still change the global model (min-nodes)

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
        stats.sampled = len(messages)
        stats.bytes_down = record_bytes(arrays) * len(messages)
        return messages

    def _validate(
        self, global_round: int, replies: list[Message], stats: RoundStats
    ) -> list[Message]:
        """The replies that pass `server.validation.accept`, rewritten to full float32 weights."""
        if self.global_arrays is None:
            raise RuntimeError("aggregate_train before configure_train: call expect(arrays) first")
        accepted: list[tuple[Message, ArrayRecord]] = []
        for msg in replies:
            try:
                weights = accept(msg.content, self.global_arrays, bits=self.update_bits,
                                 max_norm=self.max_update_norm)
            except Rejected as err:
                stats.rejected += 1
                stats.rejected_reasons[err.reason] = stats.rejected_reasons.get(err.reason, 0) + 1
                log.warning("round %d: rejected the update of node %d: %s", global_round,
                            msg.metadata.src_node_id, err)
                continue
            accepted.append((msg, weights))
        if accepted:
            common = set.intersection(*(set(m.content["metrics"]) for m, _ in accepted))
            for msg, weights in accepted:
                as_flower_reply(msg.content, weights, common)
        return [msg for msg, _ in accepted]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        global_round = self.round_offset + server_round
        stats = self.rounds.setdefault(global_round, RoundStats(global_round))
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        stats.failed = len(replies) - len(ok)
        stats.bytes_up += sum(reply_bytes(m.content) for m in ok)  # rejected ones travelled too
        accepted = self._validate(global_round, ok, stats)
        for msg in accepted:
            metrics = msg.content["metrics"]
            stats.energy_j += float(metrics.get("energy-j", 0.0))
            stats.cycles += int(metrics.get("cycles", 0))
            stats.dram_bytes += int(metrics.get("dram-bytes", 0))
        if len(accepted) < self.min_valid:
            log.warning("round %d: %d valid updates, fewer than min-nodes=%d: the global model "
                        "stays unchanged", global_round, len(accepted), self.min_valid)
            return None, None
        arrays, metrics = super().aggregate_train(global_round, accepted)  # type: ignore[misc]
        problem = unusable(arrays) if arrays is not None else None
        if problem:
            log.warning("round %d: the aggregate is not a usable model (%s): the global model "
                        "stays unchanged", global_round, problem)
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
        if global_round in self.rounds:  # the global model travels down again for evaluation
            self.rounds[global_round].bytes_down += record_bytes(arrays) * len(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        global_round = self.round_offset + server_round
        metrics = super().aggregate_evaluate(global_round, replies)  # type: ignore[misc]
        if metrics is not None and global_round in self.rounds:
            self.rounds[global_round].client_accuracy = _maybe_float(metrics.get("accuracy"))
        return metrics


def _maybe_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


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


def make_strategy(config: RunConfig, *, round_offset: int = 0) -> RoundRecorder:
    """The configured Flower strategy with validation and round recording: waits for
    `min-clients` nodes, then samples `fraction-train` of them (at least `min-nodes`) each round."""
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
    return strategy
