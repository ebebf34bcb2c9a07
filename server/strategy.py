"""Strategy factory: Flower's own strategies, each extended by one mixin that records every round.

`make_strategy(config, recorder)` picks FedAvg, FedProx, FedAdam, FedMedian, FedTrimmedAvg or Krum
from `flwr.serverapp.strategy` and subclasses it with `RoundRecorder`, which calls `super()` in the
train hooks and only adds bookkeeping: the global round number (continuing after a resume), the
replies received, bytes sent and received, the clients' summed chip energy, cycles and DRAM bytes,
and their spike density.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from shared.config import RunConfig


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array payload an ArrayRecord carries."""
    return sum(len(array.data) for array in record.values())


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
    """Mixin for a Flower strategy: records a `RoundStats` per round into `self.rounds`."""

    round_offset: int = 0
    on_round_start: Callable[[RoundStats], None] | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: dict[int, RoundStats] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        global_round = self.round_offset + server_round
        stats = self.rounds[global_round] = RoundStats(global_round)
        if self.on_round_start is not None:
            self.on_round_start(stats)
        messages = list(super().configure_train(global_round, arrays, config, grid))  # type: ignore[misc]
        stats.sampled = len(messages)
        stats.bytes_down = record_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        global_round = self.round_offset + server_round
        stats = self.rounds.setdefault(global_round, RoundStats(global_round))
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        stats.failed = len(replies) - len(ok)
        stats.clients = len(ok)
        for msg in ok:
            stats.bytes_up += sum(record_bytes(r) for r in msg.content.array_records.values())
            for metrics in msg.content.metric_records.values():
                stats.energy_j += float(metrics.get("energy-j", 0.0))
                stats.cycles += int(metrics.get("cycles", 0))
                stats.dram_bytes += int(metrics.get("dram-bytes", 0))
        arrays, metrics = super().aggregate_train(global_round, replies)  # type: ignore[misc]
        if metrics is not None:
            stats.train_loss = _maybe_float(metrics.get("loss"))
            stats.train_accuracy = _maybe_float(metrics.get("accuracy"))
            stats.spike_density = _maybe_float(metrics.get("spike-density"))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(  # type: ignore[misc]
            self.round_offset + server_round, arrays, config, grid
        )

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


def _base(config: RunConfig) -> tuple[type[Strategy], dict]:
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
            return Krum, {"num_malicious_nodes": config.krum_malicious}
    raise ValueError(f"unknown strategy {config.strategy!r}")


def make_strategy(config: RunConfig, *, round_offset: int = 0) -> RoundRecorder:
    """The configured Flower strategy with round recording: waits for `min-clients` nodes, then
    samples `fraction-train` of them (at least `min-nodes`) each round."""
    base, kwargs = _base(config)
    cls = type(f"Recorded{base.__name__}", (RoundRecorder, base), {})
    num_nodes = config.min_clients
    min_nodes = min(config.min_nodes, num_nodes)
    strategy = cls(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes if config.fraction_evaluate > 0 else 0,
        min_available_nodes=num_nodes,
        **kwargs,
    )
    strategy.round_offset = round_offset
    return strategy
