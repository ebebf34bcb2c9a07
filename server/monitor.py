"""`spikefed-monitor`: a live terminal dashboard of a running federation, read from its `/metrics`.

The monitor only scrapes the exporter (`server.metrics`), like Prometheus would: it parses the
text exposition with prometheus-client's parser into a `Snapshot`, keeps the accuracy and loss of
every round it has seen (for the sparklines), and redraws a rich dashboard every `--interval`
seconds. `--once` prints one snapshot and exits. A URL that cannot be read at start is a one-line
error (exit code 2); a run that ends while watched shows as unreachable until Ctrl-C. The monitor
imports neither torch nor flwr, so it starts fast on any machine that can reach the endpoint.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Annotated

import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from shared.cli import user_errors
from shared.errors import UserError

SPARK = "▁▂▃▄▅▆▇█"
console = Console(highlight=False)
cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


class MonitorError(UserError):
    """The endpoint cannot be read or is not spikefed's: one line, exit code 2."""


@dataclass
class Snapshot:
    """The values of one scrape of a spikefed exporter (missing metrics read as None / empty)."""

    version: str | None = None
    round: int | None = None
    rounds_planned: int | None = None
    rounds_completed: int | None = None
    accuracy: float | None = None
    loss: float | None = None
    clients: int | None = None
    updates: dict[str, float] = field(default_factory=dict)  # status -> count
    rejected: dict[str, float] = field(default_factory=dict)  # reason -> count
    bytes: dict[str, float] = field(default_factory=dict)  # direction -> bytes
    energy_j: float | None = None
    dram_bytes: float | None = None
    cycles: float | None = None
    spike_density: float | None = None
    last_round_seconds: float | None = None
    mean_round_seconds: float | None = None
    # a fleet run (`--fleet`): simulated time and energy, dropped replies
    fleet_selected: int | None = None
    fleet_dropped: dict[str, float] = field(default_factory=dict)  # reason -> count
    fleet_sim_seconds: float | None = None
    fleet_last_sim_seconds: float | None = None
    fleet_energy_j: float | None = None
    fleet_energy: dict[str, float] = field(default_factory=dict)  # device class -> joules


def parse_metrics(text: str) -> Snapshot:
    """A `Snapshot` of exposition text; a `ValueError` when it holds no spikefed metrics."""
    values: dict[str, float] = {}
    labelled: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("spikefed_"):
                continue
            if sample.name == "spikefed_build_info":
                values["version"] = sample.labels.get("version")  # type: ignore[assignment]
            elif sample.labels and "le" not in sample.labels:
                (label,) = sample.labels.values()
                labelled.setdefault(sample.name, {})[label] = sample.value
            else:
                values[sample.name] = sample.value
    if not values and not labelled:
        raise ValueError("no spikefed_* metrics in the response")

    def integer(name: str) -> int | None:
        return int(values[name]) if name in values else None

    count = values.get("spikefed_round_duration_seconds_count")
    total = values.get("spikefed_round_duration_seconds_sum")
    return Snapshot(
        version=values.get("version"),  # type: ignore[arg-type]
        round=integer("spikefed_round"),
        rounds_planned=integer("spikefed_rounds_planned"),
        rounds_completed=integer("spikefed_rounds_completed_total"),
        accuracy=values.get("spikefed_global_accuracy"),
        loss=values.get("spikefed_global_loss"),
        clients=integer("spikefed_clients_participating"),
        updates=labelled.get("spikefed_client_updates_total", {}),
        rejected=labelled.get("spikefed_rejected_updates_total", {}),
        bytes=labelled.get("spikefed_update_bytes_total", {}),
        energy_j=values.get("spikefed_neurocore_energy_joules_total"),
        dram_bytes=values.get("spikefed_neurocore_dram_bytes_total"),
        cycles=values.get("spikefed_neurocore_cycles_total"),
        spike_density=values.get("spikefed_spike_density"),
        last_round_seconds=values.get("spikefed_last_round_duration_seconds"),
        mean_round_seconds=total / count if count else None,
        fleet_selected=integer("spikefed_fleet_devices_selected"),
        fleet_dropped=labelled.get("spikefed_fleet_dropped_updates_total", {}),
        fleet_sim_seconds=values.get("spikefed_fleet_sim_seconds_total"),
        fleet_last_sim_seconds=values.get("spikefed_fleet_last_round_sim_seconds"),
        fleet_energy_j=values.get("spikefed_fleet_energy_joules_total"),
        fleet_energy=labelled.get("spikefed_fleet_class_energy_joules_total", {}),
    )


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """Fetch and parse `url`; a `MonitorError` (one line) when it cannot be read or parsed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise MonitorError(
            f"cannot read metrics from {url}: {reason} (is the run up, and is this its "
            "metrics URL? spikefed-run prints it at start)"
        ) from None
    try:
        return parse_metrics(text)
    except ValueError as err:
        raise MonitorError(f"{url} is not a spikefed metrics endpoint: {err}") from None


def sparkline(values: list[float]) -> str:
    """Unicode block sparkline of `values`, scaled to their own min..max."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    return "".join(
        SPARK[int((v - low) / span * (len(SPARK) - 1)) if span else len(SPARK) // 2]
        for v in values
    )


class History:
    """Accuracy and loss by completed round, as the monitor saw them (for the sparklines)."""

    def __init__(self) -> None:
        self.by_round: dict[int, tuple[float, float]] = {}

    def add(self, snap: Snapshot) -> None:
        if None not in (snap.rounds_completed, snap.accuracy, snap.loss):
            self.by_round[snap.rounds_completed] = (snap.accuracy, snap.loss)  # type: ignore[index,assignment]

    def series(self, i: int) -> list[float]:
        return [self.by_round[r][i] for r in sorted(self.by_round)]


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value if scale == 1 else value * scale, fmt)


def render(snap: Snapshot, history: History, url: str, status: str = "") -> Panel:
    """The dashboard: progress and model quality, client updates, and traffic / chip figures."""
    planned = f"/{snap.rounds_planned}" if snap.rounds_planned else ""
    head = Table.grid(padding=(0, 3))
    head.add_row(
        f"[bold]round {_num(snap.round, 'd')}{planned}[/]",
        f"completed {_num(snap.rounds_completed, 'd')}",
        f"clients {_num(snap.clients, 'd')}",
        f"round time {_num(snap.last_round_seconds, '.1f')} s "
        f"(mean {_num(snap.mean_round_seconds, '.1f')} s)",
    )
    quality = Table(box=None, padding=(0, 2), show_header=False)
    quality.add_column(style="bold")
    quality.add_column(justify="right")
    quality.add_column()
    quality.add_row("accuracy", _num(snap.accuracy, ".2%"), sparkline(history.series(0)))
    quality.add_row("loss", _num(snap.loss, ".4f"), sparkline(history.series(1)))
    quality.add_row("spike density", _num(snap.spike_density, ".3f"), "")

    updates = Table(title="client updates", box=None, padding=(0, 2), title_justify="left")
    for status_name in ("accepted", "rejected", "failed"):
        updates.add_column(status_name, justify="right")
    updates.add_row(*(_num(snap.updates.get(s), ".0f") for s in ("accepted", "rejected", "failed")))
    reasons = ", ".join(f"{r} {n:.0f}" for r, n in sorted(snap.rejected.items()) if n)

    traffic = Table(title="traffic and chip", box=None, padding=(0, 2), title_justify="left")
    for col in ("MB up", "MB down", "energy J", "DRAM MB", "cycles"):
        traffic.add_column(col, justify="right")
    traffic.add_row(
        _num(snap.bytes.get("up"), ".2f", 1e-6),
        _num(snap.bytes.get("down"), ".2f", 1e-6),
        _num(snap.energy_j, ".4g"),
        _num(snap.dram_bytes, ".2f", 1e-6),
        _num(snap.cycles, ",.0f"),
    )
    parts = [head, quality, updates]
    if reasons:
        parts.append(f"rejected by reason: {reasons}")
    parts.append(traffic)
    if snap.fleet_energy or (snap.fleet_sim_seconds or 0) > 0:  # a fleet run
        parts.append(fleet_table(snap))
    if status:
        parts.append(f"[yellow]{status}[/]")
    version = f" {snap.version}" if snap.version else ""
    return Panel(Group(*parts), title=f"spikefed{version}  {url}", title_align="left")


def fleet_table(snap: Snapshot) -> Table:
    """A fleet run's simulated time, dropped replies and the devices' energy by class."""
    table = Table(title="fleet (simulated)", box=None, padding=(0, 2), title_justify="left")
    columns = ["selected", "stragglers", "out of energy", "sim s (last)", "sim s total",
               *(f"{name} J" for name in sorted(snap.fleet_energy)), "total J"]
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(
        _num(snap.fleet_selected, "d"),
        _num(snap.fleet_dropped.get("straggler"), ".0f"),
        _num(snap.fleet_dropped.get("out-of-energy"), ".0f"),
        _num(snap.fleet_last_sim_seconds, ".2f"),
        _num(snap.fleet_sim_seconds, ".1f"),
        *(_num(snap.fleet_energy[name], ".3g") for name in sorted(snap.fleet_energy)),
        _num(snap.fleet_energy_j, ".3g"),
    )
    return table


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-monitor\n\n"
    "  spikefed-monitor --url http://10.0.0.5:9464/metrics --interval 5\n\n"
    "  spikefed-monitor --once"
)
@user_errors
def main(
    url: Annotated[
        str, typer.Option(help="The run's metrics endpoint (spikefed-run prints it).")
    ] = "http://127.0.0.1:9464/metrics",
    once: Annotated[bool, typer.Option(help="Print one snapshot and exit.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
) -> None:
    """Watch a running federation: round, accuracy and loss, clients, updates, bytes, energy."""
    history = History()
    snap = scrape(url)
    history.add(snap)
    if once:
        console.print(render(snap, history, url))
        return
    with Live(render(snap, history, url), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    snap, status = scrape(url), ""
                    history.add(snap)
                except MonitorError as err:
                    status = f"{time.strftime('%H:%M:%S')} {err}"
                live.update(render(snap, history, url, status), refresh=True)
        except KeyboardInterrupt:
            pass


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
