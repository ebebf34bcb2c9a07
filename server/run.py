"""`spikefed-run`: the whole federation on this machine with Flower's simulation engine (Ray).

The ServerApp runs in this process (so it can drive the live display); every simulated edge client
is the real ClientApp (`client.app:app`) in a Ray actor with one CPU.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from server.cli import UserError, parse_overrides, resolve_config, user_errors
from server.federation import Federation, Observers
from server.metrics import MetricsExporter, start_exporter
from server.report import write_report
from server.strategy import RoundStats
from shared.byzantine import KINDS
from shared.config import RunConfig
from shared.fleet import load_fleet
from shared.rundir import RoundRecord, RunDir, unique_run_dir

CLIENT_APP = "client.app:app"
BYZANTINE_CLIENT_APP = "client.byzantine:app"  # the honest app behind a fault-injecting mod

console = Console(highlight=False)
cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


class LiveProgress:
    """Observer that shows one progress bar for the run and prints a line per finished round."""

    def __init__(self, progress: Progress, total_rounds: int) -> None:
        self.progress = progress
        self.total = total_rounds
        self.task = progress.add_task("starting", total=total_rounds)

    def on_start(self, config: RunConfig, first_round: int, initial: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=first_round - 1)
        what = "resumed model" if first_round > 1 else "initial model"
        self.progress.console.print(
            f"{what}: accuracy {initial['accuracy']:.2%}, loss {initial['loss']:.3f}"
        )

    def on_round_start(self, stats: RoundStats) -> None:
        self.progress.update(self.task, description=f"round {stats.round}/{self.total} training")

    def on_round_end(self, record: RoundRecord) -> None:
        self.progress.console.print(
            f"round {record.round:>3}/{self.total}  accuracy {record.accuracy:7.2%}  "
            f"loss {record.loss:.3f}  clients {record.clients}"
            + (f" ({record.failed} failed)" if record.failed else "")
            + (f" ({record.rejected} rejected)" if record.rejected else "")
            + (f" ({record.stragglers} stragglers)" if record.stragglers else "")
            + (f" ({record.out_of_energy} out of energy)" if record.out_of_energy else "")
            + (f"  sim {record.sim_seconds:.2f}s {record.sim_energy_j:.3g}J"
               if record.sim_seconds is not None and record.sim_energy_j is not None else "")
            + f"  {record.duration_s:.1f}s"
        )
        self.progress.update(self.task, advance=1, description="evaluated")


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="spikefed run", title_justify="left")
    history = list(map(RoundRecord.from_json, summary["history"]))
    fleet = any(r.sim_seconds is not None for r in history)
    columns = ["round", "accuracy", "loss", "clients", "rejected", "MB up", "MB down", "seconds"]
    if fleet:
        columns += ["selected", "stragglers", "out of energy", "sim s", "sim J"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in history:
        row = [str(r.round), f"{r.accuracy:.2%}", f"{r.loss:.3f}", str(r.clients),
               str(r.rejected), f"{r.bytes_up / 1e6:.2f}", f"{r.bytes_down / 1e6:.2f}",
               f"{r.duration_s:.1f}"]
        if fleet:
            row += [str(r.selected), str(r.stragglers), str(r.out_of_energy),
                    _maybe(r.sim_seconds, ".2f"), _maybe(r.sim_energy_j, ".3g")]
        table.add_row(*row)
    return table


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def fleet_lines(summary: dict[str, Any]) -> list[str]:
    """The fleet's figures in a few lines: simulated time and energy to each target accuracy,
    and the share of devices that ever contributed."""
    fleet = summary.get("fleet")
    if not fleet:
        return []
    time_to, energy_to = summary.get("time_to_accuracy") or {}, summary.get("energy_to_accuracy")
    reached = [f"{float(t):.0%}: {_maybe(s, '.1f')} s, {_maybe((energy_to or {}).get(t), '.3g')} J"
               for t, s in time_to.items()]
    return [f"fleet {fleet['name']} ({fleet['devices']} devices, {fleet['selection']} selection): "
            f"to accuracy {'; '.join(reached) or '-'} (simulated; '-' = not reached); "
            f"{fleet['contributed_share']:.0%} of the devices contributed"]


def _quiet_frameworks(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def simulate(
    federation: Federation,
    num_clients: int,
    *,
    cpus_per_client: float = 1.0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `federation` against `num_clients` simulated nodes; returns the run summary."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from flwr.supercore.object_ref import load_app

    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        result.update(federation.run(grid))

    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = max(os.cpu_count() or 1, int(cpus_per_client))
    if not verbose:
        init_args["logging_level"] = "error"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for
    component = BYZANTINE_CLIENT_APP if federation.byzantine else CLIENT_APP
    federation.simulation = True
    run_simulation(
        server_app=server_app,
        client_app=load_app(component, UserError),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": init_args,
        },
        verbose_logging=verbose,
    )
    if not result:
        raise RuntimeError("the simulation ended without finishing the run (see --verbose)")
    return result


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-run\n\n"
    "  spikefed-run --clients 3 --rounds 2 --out runs/quick\n\n"
    '  spikefed-run --run-config "strategy=fedmedian partitioning=iid time-steps=2"\n\n'
    '  spikefed-run --byzantine 1 --byzantine-kind sign-flip --run-config "strategy=krum"\n\n'
    "  spikefed-run --out runs/quick --rounds 5 --resume\n\n"
    "  spikefed-run --metrics-port 9464 --metrics-linger 30   # then: spikefed-monitor\n\n"
    "  spikefed-run --metrics-port 0                          # no metrics endpoint\n\n"
    "  spikefed-run --fleet deploy/fleets/edge-mix.toml --run-config "
    '"round-deadline-s=20 selection=aware"'
)
@user_errors
def main(
    clients: Annotated[
        int | None,
        typer.Option(min=1, help="Simulated edge clients \\[default: 5, or the fleet's devices]."),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Federated rounds \\[default: num-server-rounds]")
    ] = None,
    run_config: Annotated[
        str, typer.Option("--run-config", help='Overrides, e.g. "time-steps=2 lr=0.001".')
    ] = "",
    out: Annotated[
        Path | None, typer.Option(help="Run directory \\[default: runs/<date>-<time>].")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out after its last good checkpoint.")
    ] = False,
    cpus_per_client: Annotated[float, typer.Option(min=0.1, help="Ray CPUs per client.")] = 1.0,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    byzantine: Annotated[
        int,
        typer.Option(min=0, help="Simulated clients (partition-id < K) that send bad updates."),
    ] = 0,
    byzantine_kind: Annotated[
        str, typer.Option(help=f"What they send: {', '.join(KINDS)}.")
    ] = "sign-flip",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535,
            help="Prometheus /metrics port; 0 turns it off (default: run config metrics-port, "
            "9464, or a free port when that one is busy).",
        ),
    ] = None,
    metrics_linger: Annotated[
        float,
        typer.Option(min=0, help="Seconds to keep serving the final metrics after the run, so "
                     "that a scraper sees the last round (Ctrl-C ends it early)."),
    ] = 0.0,
    fleet: Annotated[
        Path | None,
        typer.Option(help="Fleet file (TOML): every client a device with its chip, link, energy "
                     "and availability (examples in deploy/fleets/); one client per device."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    evaluate: Annotated[
        bool, typer.Option(help="End with `spikefed-evaluate`'s light set on the final model.")
    ] = True,
) -> None:
    """Run the whole federation (server + simulated SNN edge clients) on this machine."""
    if resume and out is None:
        raise UserError("--resume needs --out, the run directory to continue")
    devices = None
    if fleet is None and parse_overrides(run_config).get("fleet"):
        fleet = Path(str(parse_overrides(run_config)["fleet"]))
    if fleet is not None:
        devices = load_fleet(fleet)  # a missing or bad file: one line, exit 2
        if clients is not None and clients != len(devices):
            raise UserError(f"--clients {clients}: the fleet {fleet} has {len(devices)} devices, "
                            "one client each; leave --clients out")
        clients = len(devices)
    clients = clients if clients is not None else 5
    for option, value in (("--metrics-linger", metrics_linger),
                          ("--cpus-per-client", cpus_per_client)):
        if not math.isfinite(value):
            raise UserError(f"{option} {value} is not a finite number")
    if byzantine > clients:
        raise UserError(f"--byzantine {byzantine} exceeds --clients {clients}")
    if byzantine_kind not in KINDS:
        raise UserError(f"--byzantine-kind {byzantine_kind!r}: choose one of {', '.join(KINDS)}")
    fresh = out is None
    out = out or unique_run_dir("runs")  # made here, so two runs never share a default name
    flags: dict[str, Any] = {"min-clients": clients, "out-dir": str(out)}
    if fleet is not None:
        flags["fleet"] = str(fleet.expanduser().resolve())
    if rounds is not None:
        flags["num-server-rounds"] = rounds
    try:
        port_chosen = metrics_port is not None or "metrics-port" in parse_overrides(run_config)
        config = resolve_config(run_config, flags, metrics_port=metrics_port)
    except UserError:
        if fresh:
            out.rmdir()
        raise
    _quiet_frameworks(verbose)
    steps = config.model_spec()["time_steps"]  # an event dataset brings its own T
    trains = (f"QC-ANN {config.model} (L={steps}, converted to an IF SNN at the end)"
              if config.train_mode == "qann"
              else f"{config.model} ({config.neuron}, T={steps})")
    console.print(
        f"[bold]spikefed[/] {trains} on "
        f"{config.dataset}: {clients} clients, {config.num_server_rounds} rounds, "
        f"{config.strategy}, {config.partitioning} partitions -> {out}"
        + (f"; {byzantine} byzantine ({byzantine_kind})" if byzantine else "")
    )
    if devices is not None:
        classes = ", ".join(f"{n} {name}" for name, n in devices.counts().items())
        deadline = (f"deadline {config.round_deadline_s:g} s" if config.round_deadline_s
                    else "no deadline")
        console.print(f"fleet {devices.name}: {classes}; {config.selection} selection, "
                      f"{deadline}")
    federation = Federation(config, out, resume=resume, byzantine_nodes=byzantine,
                            byzantine_kind=byzantine_kind)
    exporter = start_exporter(config, any_port_if_busy=not port_chosen)
    if exporter is not None:
        console.print(f"metrics: {exporter.url}  (watch: spikefed-monitor --url {exporter.url})")
    try:
        summary = _run_with_progress(federation, exporter, clients, cpus_per_client,
                                     ray_address, verbose)
        if summary["history"]:
            console.print(summary_table(summary))
        report = write_report(summary, out)
        for line in fleet_lines(summary):
            console.print(line)
        console.print(
            f"final accuracy [bold]{summary['final_accuracy']:.2%}[/] after {summary['rounds']} "
            f"rounds in {summary['duration_s']:.0f}s; summary: {RunDir(out).summary_file}, "
            f"report: {report}"
        )
        conversion = summary.get("conversion")
        if conversion:
            console.print(
                f"converted SNN (IF, T={conversion['time_steps']}): accuracy "
                f"[bold]{conversion['snn_accuracy']:.2%}[/] (QC-ANN "
                f"{conversion['ann_accuracy']:.2%}); checkpoint: {conversion['checkpoint']}"
            )
        if evaluate and summary.get("checkpoint"):
            # a qann run is judged by the SNN it deploys (already converted and calibrated)
            final = (conversion or {}).get("checkpoint") or summary["checkpoint"]
            final_evaluation(Path(final), RunDir(out).evaluation_dir, config)
        if exporter is not None and metrics_linger > 0:
            linger(exporter, metrics_linger)
    finally:
        if exporter is not None:
            exporter.stop()


def _run_with_progress(
    federation: Federation,
    exporter: MetricsExporter | None,
    clients: int,
    cpus_per_client: float,
    ray_address: str | None,
    verbose: bool,
) -> dict[str, Any]:
    """Simulate the federation under a live progress bar (and the exporter, when there is one)."""
    config = federation.config
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        federation.observer = Observers(LiveProgress(progress, config.num_server_rounds), exporter)
        return simulate(
            federation,
            clients,
            cpus_per_client=cpus_per_client,
            ray_address=ray_address,
            verbose=verbose,
        )


def final_evaluation(checkpoint: Path, out: Path, config: RunConfig) -> dict[str, Any]:
    """`spikefed-evaluate`'s light set on the final global model (robust accuracy at the
    dataset's headline budget from PGD, FGSM and the square search, one restart): tables on the
    console, `evaluation.json` and `report.md` (+ plots) in `out`."""
    from shared import evaluate

    options = evaluate.light_options(
        config.dataset, data_dir=config.data_dir or None, seed=config.seed,
        chip=config.chip if config.chip != "none" else evaluate.LIGHT.chip)
    with Progress(SpinnerColumn(), TextColumn("[bold]final evaluation: {task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        result = evaluate.evaluate_checkpoint(
            checkpoint, options, on_stage=lambda s: progress.update(task, description=s))
    for table in evaluate.console_tables(result):
        console.print(table)
    evaluate.write_json(result, out / "evaluation.json")
    report = evaluate.write_report(result, out / "report.md")
    run_report = out.parent / "report.md"
    if run_report.is_file():  # the run's report points at its final evaluation
        integer = result["integer"]
        exact = (f"; integer engine bit-exact: {integer['bit_exact']} on {integer['samples']}"
                 if integer["samples"] else "")
        robust = result.get("robustness")
        headline = (f"; robust accuracy {robust['robust_accuracy']:.2%} at "
                    f"{robust['budget_label']} (worst case over {', '.join(robust['attacks'])}; "
                    "light set, `spikefed-evaluate` runs the full one)"
                    if robust and robust["robust_accuracy"] is not None else "")
        with run_report.open("a") as f:
            f.write(f"\n## Final evaluation\n\nAccuracy {result['accuracy']:.2%}{exact}"
                    f"{headline}; accuracy over T, attacks, robustness checks and chip energy "
                    f"in [{out.name}/report.md]({out.name}/report.md).\n")
    console.print(f"evaluation: {report}")
    return result


def linger(exporter: MetricsExporter, seconds: float) -> None:
    """Keep serving the final metrics for `seconds`; Ctrl-C or SIGTERM ends the wait quietly."""

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    console.print(f"serving the final metrics at {exporter.url} for {seconds:g}s (Ctrl-C ends it)")
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
