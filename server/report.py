"""A finished run's plots and `report.md`, drawn from its summary (matplotlib, Agg backend).

    runs/<name>/plots/accuracy_loss.png   global test accuracy and loss per round
    runs/<name>/plots/energy_dram.png     clients' chip energy (J) and DRAM traffic (MB) per round
    runs/<name>/plots/bytes.png           model payload up and down per round (MB)
    runs/<name>/plots/fleet_accuracy.png  a fleet run: accuracy over simulated seconds and joules
    runs/<name>/plots/fleet_rounds.png    a fleet run: selected / aggregated / stragglers / out of
                                          energy and the devices' energy by class, per round
    runs/<name>/report.md                 the run in one page: settings, results, the plots

Round 0 in the accuracy plot is the model before training (`summary["initial"]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.rundir import RoundRecord, RunDir

PLOTS = {
    "accuracy_loss.png": "Global accuracy and loss per round",
    "energy_dram.png": "Neuromorphic chip energy and DRAM traffic per round",
    "bytes.png": "Bytes up and down per round",
    "fleet_accuracy.png": "Accuracy over the fleet's simulated time and energy",
    "fleet_rounds.png": "Devices and their energy per round",
}
CLASS_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                "#8c8c8c", "#ccb974", "#64b5cd")


def write_plots(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The three per-round plots of `summary` as PNG files in `out_dir`; none without rounds."""
    history = [RoundRecord.from_json(e) for e in summary.get("history") or []]
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = [r.round for r in history]
    initial = summary.get("initial") or {}
    paths = []

    fig, acc_ax = plt.subplots(figsize=(6, 3.5))
    points = [(r.round, r.accuracy, r.loss) for r in history]
    if "accuracy" in initial:
        points.insert(0, (initial["round"], initial["accuracy"], initial["loss"]))
    xs, acc, loss = zip(*points, strict=True)
    acc_ax.plot(xs, [100 * a for a in acc], "o-", color="#4c72b0", label="accuracy")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("test accuracy (%)", color="#4c72b0")
    loss_ax = acc_ax.twinx()
    loss_ax.plot(xs, loss, "s--", color="#dd8452", label="loss")
    loss_ax.set_ylabel("test loss", color="#dd8452")
    acc_ax.set_title(PLOTS["accuracy_loss.png"])
    paths.append(_save(plt, fig, out / "accuracy_loss.png"))

    fig, energy_ax = plt.subplots(figsize=(6, 3.5))
    energy_ax.bar(rounds, [r.energy_j * 1e3 for r in history], color="#55a868")
    energy_ax.set_xlabel("round")
    energy_ax.set_ylabel("chip energy (mJ)", color="#55a868")
    dram_ax = energy_ax.twinx()
    dram_ax.plot(rounds, [r.dram_bytes / 1e6 for r in history], "o-", color="#c44e52")
    dram_ax.set_ylabel("DRAM traffic (MB)", color="#c44e52")
    energy_ax.set_title(PLOTS["energy_dram.png"])
    paths.append(_save(plt, fig, out / "energy_dram.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.4
    ax.bar([r - width / 2 for r in rounds], [r.bytes_up / 1e6 for r in history], width,
           label="up (clients -> server)", color="#8172b3")
    ax.bar([r + width / 2 for r in rounds], [r.bytes_down / 1e6 for r in history], width,
           label="down (server -> clients)", color="#937860")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.legend()
    ax.set_title(PLOTS["bytes.png"])
    paths.append(_save(plt, fig, out / "bytes.png"))
    if any(r.sim_seconds is not None for r in history):
        paths += _fleet_plots(plt, history, initial, out)
    return paths


def _fleet_plots(plt: Any, history: list[RoundRecord], initial: dict[str, Any],
                 out: Path) -> list[Path]:
    """Accuracy over cumulative simulated seconds and joules; devices and energy per round."""
    seconds, joules, total_s, total_j = [0.0], [0.0], 0.0, 0.0
    accuracy = [100 * initial.get("accuracy", 0.0)]
    for r in history:
        total_s += r.sim_seconds or 0.0
        total_j += r.sim_energy_j or 0.0
        seconds.append(total_s)
        joules.append(total_j)
        accuracy.append(100 * r.accuracy)
    fig, (time_ax, energy_ax) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    time_ax.plot(seconds, accuracy, "o-", color="#4c72b0")
    time_ax.set_xlabel("simulated seconds")
    time_ax.set_ylabel("test accuracy (%)")
    energy_ax.plot(joules, accuracy, "o-", color="#55a868")
    energy_ax.set_xlabel("fleet energy (J)")
    fig.suptitle(PLOTS["fleet_accuracy.png"])
    paths = [_save(plt, fig, out / "fleet_accuracy.png", integer_x=False)]

    rounds = [r.round for r in history]
    fig, (count_ax, energy_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.2
    series = (("selected", [r.selected for r in history], "#4c72b0"),
              ("aggregated", [r.clients for r in history], "#55a868"),
              ("stragglers", [r.stragglers for r in history], "#dd8452"),
              ("out of energy", [r.out_of_energy for r in history], "#c44e52"))
    for i, (label, values, color) in enumerate(series):
        count_ax.bar([x + (i - 1.5) * width for x in rounds], values, width, label=label,
                     color=color)
    count_ax.set_xlabel("round")
    count_ax.set_ylabel("devices")
    count_ax.legend(fontsize=7)
    classes = sorted({c for r in history for c in r.energy_by_class})
    bottom = [0.0] * len(history)
    for i, name in enumerate(classes):
        values = [r.energy_by_class.get(name, 0.0) for r in history]
        energy_ax.bar(rounds, values, bottom=bottom, label=name,
                      color=CLASS_COLORS[i % len(CLASS_COLORS)])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    energy_ax.set_xlabel("round")
    energy_ax.set_ylabel("device energy (J)")
    if classes:
        energy_ax.legend(fontsize=7)
    fig.suptitle(PLOTS["fleet_rounds.png"])
    paths.append(_save(plt, fig, out / "fleet_rounds.png"))
    return paths


def _save(plt: Any, fig: Any, path: Path, *, integer_x: bool = True) -> Path:
    """Integer round ticks, y axes from 0 (except loss), then write and close the figure."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "loss" not in ax.get_ylabel():
            ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `plots/` and `report.md` for a finished run into `out_dir`; returns report.md."""
    run = RunDir(Path(out_dir))
    plots = write_plots(summary, run.plots_dir)
    config = summary.get("config") or {}
    history = [RoundRecord.from_json(e) for e in summary.get("history") or []]
    lines = [
        "# spikefed run report",
        "",
        f"{config.get('model', '?')} ({config.get('neuron', '?')}, "
        f"T = {config.get('time-steps', '?')}, {config.get('weight-bits', '?')}-bit weights) on "
        f"{config.get('dataset', '?')}, {config.get('min-clients', '?')} clients, "
        f"{config.get('strategy', '?')}, {config.get('partitioning', '?')} partitions, "
        f"chip `{config.get('chip', '?')}`.",
        "",
        f"- rounds: {summary.get('rounds', len(history))}",
        f"- final accuracy: {_pct(summary.get('final_accuracy'))}, "
        f"best {_pct(summary.get('best_accuracy'))}",
        f"- rejected updates: {summary.get('rejected_updates', 0)}",
        f"- wall time: {summary.get('duration_s', 0.0):.1f} s",
        "",
    ]
    if history:
        lines += [
            "| round | accuracy | loss | clients | failed | rejected | MB up | MB down "
            "| chip mJ | DRAM MB | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in history:
            lines.append(
                f"| {r.round} | {_pct(r.accuracy)} | {r.loss:.3f} | {r.clients} | {r.failed} "
                f"| {r.rejected} | {r.bytes_up / 1e6:.2f} | {r.bytes_down / 1e6:.2f} "
                f"| {r.energy_j * 1e3:.3f} | {r.dram_bytes / 1e6:.2f} | {r.duration_s:.1f} |"
            )
        lines.append("")
    lines += fleet_section(summary, history)
    for path in plots:
        lines += [f"## {PLOTS[path.name]}", "", f"![{PLOTS[path.name]}](plots/{path.name})", ""]
    run.report_file.write_text("\n".join(lines))
    return run.report_file


def fleet_section(summary: dict[str, Any], history: list[RoundRecord]) -> list[str]:
    """report.md's fleet part: time and energy to accuracy, devices per class, the rounds."""
    fleet = summary.get("fleet")
    if not fleet:
        return []
    deadline = fleet.get("round_deadline_s") or 0
    lines = [
        "## Fleet",
        "",
        f"Fleet `{fleet.get('name')}` ({fleet.get('devices')} devices, `{fleet.get('file')}`), "
        f"{fleet.get('selection')} selection, "
        + (f"round deadline {deadline:g} simulated s." if deadline else "no round deadline.")
        + " Simulated seconds and joules come from each device's chip model (cycles at its "
        "clock, chip joules) and its link (bytes at its bandwidth and latency, radio energy); "
        f"{_pct(fleet.get('contributed_share'))} of the devices contributed an update.",
        "",
        "| target accuracy | simulated s | fleet J |",
        "|---:|---:|---:|",
    ]
    time_to = summary.get("time_to_accuracy") or {}
    energy_to = summary.get("energy_to_accuracy") or {}
    for target, value in time_to.items():
        lines.append(f"| {_pct(float(target))} | {_num(value, '.2f', 'not reached')} "
                     f"| {_num(energy_to.get(target), '.3g', 'not reached')} |")
    lines += ["", "| class | devices | selected | aggregated | devices contributed | stragglers "
              "| out of energy | J |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in (fleet.get("classes") or {}).items():
        lines.append(f"| {name} | {c['devices']} | {c['selected']} | {c['contributed']} "
                     f"| {c['devices_contributed']} | {c['stragglers']} | {c['out_of_energy']} "
                     f"| {c['energy_j']:.3g} |")
    lines += ["", "| round | online | selected | aggregated | stragglers | out of energy "
              "| simulated s | fleet J |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in history:
        lines.append(f"| {r.round} | {_num(r.online, 'd')} | {r.selected} | {r.clients} "
                     f"| {r.stragglers} | {r.out_of_energy} | {_num(r.sim_seconds, '.2f')} "
                     f"| {_num(r.sim_energy_j, '.3g')} |")
    return [*lines, ""]


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"
