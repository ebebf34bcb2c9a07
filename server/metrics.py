"""The ServerApp's Prometheus exporter: a run's progress as `spikefed_*` metrics on `/metrics`.

Flower has no metrics endpoint, so the ServerApp serves its own with prometheus-client. The
exporter is a `server.federation.Observer`: the federation tells it when a round starts and ends,
and it turns the round's record (`RoundStats` and the history entry) into gauges, counters and a
histogram. Scraping never touches the federation; it only reads the metric values.

    spikefed_build_info{version}                     1, the running spikefed version
    spikefed_round                                   the round in progress (or last finished)
    spikefed_rounds_planned                          rounds this run will do
    spikefed_rounds_completed_total                  rounds finished (a resumed run starts at its
                                                     checkpoint's round)
    spikefed_global_accuracy, spikefed_global_loss   the global model on the test split, 0..1 / nats
    spikefed_round_duration_seconds                  histogram of round wall time
    spikefed_last_round_duration_seconds             the newest round's wall time
    spikefed_clients_participating                   updates aggregated in the newest round
    spikefed_client_updates_total{status}            accepted | rejected | failed client updates
    spikefed_rejected_updates_total{reason}          rejected updates by validation reason
    spikefed_update_bytes_total{direction}           up (clients -> server) | down payload bytes
    spikefed_neurocore_energy_joules_total           the clients' chip-accounted training energy
    spikefed_neurocore_dram_bytes_total              ... and DRAM traffic
    spikefed_neurocore_cycles_total                  ... and cycles
    spikefed_spike_density                           mean spike density of the newest round, 0..1
  with a fleet (`--fleet`, shared.fleet):
    spikefed_fleet_devices_selected                  devices asked to train in the newest round
    spikefed_fleet_dropped_updates_total{reason}     straggler | out-of-energy replies dropped
    spikefed_fleet_sim_seconds_total                 the fleet's simulated seconds, all rounds
    spikefed_fleet_last_round_sim_seconds            the newest round's simulated seconds
    spikefed_fleet_energy_joules_total               joules the devices spent (chip + radio)
    spikefed_fleet_class_energy_joules_total{device_class}   ... by device class

Labels have bounded value sets, created at start so that they read 0 rather than being absent:
`status`, `direction` and the fleet's `reason` are fixed, `device_class` takes the fleet file's
classes, and `reason` takes the known validation reasons plus at most
`MAX_REASONS` others (further new reasons count as "other"). Nothing is labelled by client: node
ids are unbounded, so per-client figures stay in the run's metrics.jsonl.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.exposition import generate_latest

from server.strategy import RoundStats
from server.validation import REASONS
from shared.config import RunConfig
from shared.errors import RunError
from shared.rundir import RoundRecord

log = logging.getLogger("spikefed")

UPDATE_STATUSES = ("accepted", "rejected", "failed")
DIRECTIONS = ("up", "down")
DROP_REASONS = ("straggler", "out-of-energy")
# the update validation's reasons, created at start so they read 0; others added on first use
KNOWN_REASONS = (*REASONS, "other")
MAX_REASONS = 16
DEFAULT_PORT: int = RunConfig.model_fields["metrics_port"].default
ROUND_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


def spikefed_version() -> str:
    try:
        return metadata.version("spikefed")
    except metadata.PackageNotFoundError:
        return "unknown"


class MetricsExporter:
    """Prometheus metrics of one federated run, in a registry of their own (so that several runs
    or tests in one process never clash), optionally served over HTTP by `start`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("spikefed_build", "spikefed build", registry=r)
        self.round = Gauge("spikefed_round", "Round in progress, or the last finished", registry=r)
        self.rounds_planned = Gauge("spikefed_rounds_planned", "Rounds of this run", registry=r)
        self.rounds_completed = Counter(
            "spikefed_rounds_completed", "Rounds finished (evaluated and checkpointed)", registry=r
        )
        self.accuracy = Gauge(
            "spikefed_global_accuracy", "Global model accuracy on the test split (0..1)",
            registry=r,
        )
        self.loss = Gauge(
            "spikefed_global_loss", "Global model cross-entropy on the test split", registry=r
        )
        self.round_duration = Histogram(
            "spikefed_round_duration_seconds", "Wall time of a round (train, aggregate, evaluate)",
            buckets=ROUND_SECONDS_BUCKETS, registry=r,
        )
        self.last_round_duration = Gauge(
            "spikefed_last_round_duration_seconds", "Wall time of the newest round", registry=r
        )
        self.participating = Gauge(
            "spikefed_clients_participating", "Client updates aggregated in the newest round",
            registry=r,
        )
        self.updates = Counter(
            "spikefed_client_updates", "Client updates by outcome", ["status"], registry=r
        )
        self.rejected = Counter(
            "spikefed_rejected_updates", "Client updates refused by validation, by reason",
            ["reason"], registry=r,
        )
        self.update_bytes = Counter(
            "spikefed_update_bytes", "Model payload bytes sent (down) and received (up)",
            ["direction"], registry=r,
        )
        self.energy = Counter(
            "spikefed_neurocore_energy_joules",
            "Clients' local training energy on the simulated neuromorphic chip", registry=r,
        )
        self.dram = Counter(
            "spikefed_neurocore_dram_bytes",
            "Clients' local training DRAM traffic on the simulated neuromorphic chip", registry=r,
        )
        self.cycles = Counter(
            "spikefed_neurocore_cycles",
            "Clients' local training cycles on the simulated neuromorphic chip", registry=r,
        )
        self.spike_density = Gauge(
            "spikefed_spike_density", "Mean spike density of the newest round's training (0..1)",
            registry=r,
        )
        self.fleet_selected = Gauge(
            "spikefed_fleet_devices_selected", "Devices asked to train in the newest round",
            registry=r,
        )
        self.fleet_dropped = Counter(
            "spikefed_fleet_dropped_updates",
            "Replies dropped: later than the round deadline, or beyond the device's energy",
            ["reason"], registry=r,
        )
        self.fleet_seconds = Counter(
            "spikefed_fleet_sim_seconds", "The fleet's simulated seconds over all rounds",
            registry=r,
        )
        self.fleet_last_seconds = Gauge(
            "spikefed_fleet_last_round_sim_seconds", "The newest round's simulated seconds",
            registry=r,
        )
        self.fleet_energy = Counter(
            "spikefed_fleet_energy_joules",
            "Joules the fleet's devices spent (chip model + radio)", registry=r,
        )
        self.fleet_class_energy = Counter(
            "spikefed_fleet_class_energy_joules",
            "Joules the fleet's devices spent (chip model + radio), by device class",
            ["device_class"], registry=r,
        )
        self.build_info.info({"version": spikefed_version()})
        for status in UPDATE_STATUSES:
            self.updates.labels(status=status)
        for direction in DIRECTIONS:
            self.update_bytes.labels(direction=direction)
        for reason in DROP_REASONS:
            self.fleet_dropped.labels(reason=reason)
        self._reasons: set[str] = set()
        for reason in KNOWN_REASONS:
            self._reason_label(reason)
        self._stats: RoundStats | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    # -- the Observer protocol (called from the ServerApp's thread) -----------------------------
    def on_start(self, config: RunConfig, first_round: int, initial: dict[str, Any]) -> None:
        self.rounds_planned.set(config.num_server_rounds)
        self.round.set(first_round - 1)
        if first_round > 1:  # a resumed run: the checkpoint's rounds are complete
            self.rounds_completed.inc(first_round - 1)
        self.accuracy.set(initial["accuracy"])
        self.loss.set(initial["loss"])
        if config.fleet:  # the fleet's classes read 0 from the start
            from shared.fleet import load_fleet

            for name in load_fleet(config.fleet).classes:
                self.fleet_class_energy.labels(device_class=name)

    def on_round_start(self, stats: RoundStats) -> None:
        self._stats = stats  # filled in while the round trains; read back at its end
        self.round.set(stats.round)

    def on_round_end(self, record: RoundRecord) -> None:
        self.round.set(record.round)
        self.rounds_completed.inc()
        self.accuracy.set(record.accuracy)
        self.loss.set(record.loss)
        self.round_duration.observe(record.duration_s)
        self.last_round_duration.set(record.duration_s)
        self.participating.set(record.clients)
        self.updates.labels(status="accepted").inc(record.clients)
        self.updates.labels(status="failed").inc(record.failed)
        self.updates.labels(status="rejected").inc(record.rejected)
        reasons = dict(record.rejected_reasons)
        unexplained = record.rejected - sum(reasons.values())
        if unexplained > 0:
            reasons["other"] = reasons.get("other", 0) + unexplained
        for reason, count in reasons.items():
            self.rejected.labels(reason=self._reason_label(reason)).inc(count)
        self.update_bytes.labels(direction="up").inc(record.bytes_up)
        self.update_bytes.labels(direction="down").inc(record.bytes_down)
        self.energy.inc(record.energy_j)
        self.dram.inc(record.dram_bytes)
        self.cycles.inc(record.cycles)
        if record.spike_density is not None:
            self.spike_density.set(record.spike_density)
        if record.sim_seconds is not None:
            self.fleet_selected.set(record.selected)
            self.fleet_dropped.labels(reason="straggler").inc(record.stragglers)
            self.fleet_dropped.labels(reason="out-of-energy").inc(record.out_of_energy)
            self.fleet_seconds.inc(record.sim_seconds)
            self.fleet_last_seconds.set(record.sim_seconds)
            self.fleet_energy.inc(record.sim_energy_j or 0.0)
            for name, joules in record.energy_by_class.items():
                self.fleet_class_energy.labels(device_class=name).inc(joules)
        self._stats = None

    def _reason_label(self, reason: str) -> str:
        """The label for a rejection reason, keeping the label set bounded."""
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                reason = "other"
            else:
                self._reasons.add(reason)
                self.rejected.labels(reason=reason)
        return reason

    # -- serving ------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text exposition format a scrape of `/metrics` returns."""
        return generate_latest(self.registry)

    def start(self, host: str, port: int, *, any_port_if_busy: bool = False) -> str:
        """Serve `/metrics` on host:port in a daemon thread; returns the URL.

        A busy port is a `RunError` (one line) unless `any_port_if_busy`, where the OS picks a free
        port instead (for a default port the user did not ask for)."""
        try:
            self._server, self._thread = _start_http_server(port, host, self.registry)
        except OSError as err:
            busy = err.errno == errno.EADDRINUSE
            if busy and any_port_if_busy:
                log.warning("metrics port %s:%d is in use; serving on a free port", host, port)
                return self.start(host, 0)
            if busy:
                fix = ("is already in use; choose another port with --metrics-port / "
                       "metrics-port=PORT, or 0 to turn the endpoint off")
            else:
                fix = (f"cannot be opened ({err.strerror or err}); set metrics-host to an address "
                       "of this machine (127.0.0.1, or 0.0.0.0 for all)")
            raise RunError(f"metrics endpoint {host}:{port} {fix}") from None
        bound_port = self._server.server_address[1]
        shown = host if ":" not in host else f"[{host}]"
        if host in ("0.0.0.0", "::"):
            shown = socket.gethostname()
        self.url = f"http://{shown}:{bound_port}/metrics"
        log.info("metrics endpoint: %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving (the metric values stay readable through `exposition`)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def start_exporter(config: RunConfig, *, any_port_if_busy: bool = False) -> MetricsExporter | None:
    """The exporter the run config asks for, already serving; None when `metrics-port` is 0."""
    if config.metrics_port == 0:
        return None
    exporter = MetricsExporter()
    exporter.start(config.metrics_host, config.metrics_port, any_port_if_busy=any_port_if_busy)
    return exporter
