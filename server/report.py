"""A finished run's plots and `report.md`, drawn from its summary (matplotlib, Agg backend).

    runs/<name>/plots/accuracy_loss.png   global test accuracy and loss per round
    runs/<name>/plots/energy_dram.png     clients' chip energy (J) and DRAM traffic (MB) per round
    runs/<name>/plots/bytes.png           model payload up and down per round (MB)
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
}


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
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Integer round ticks, y axes from 0 (except loss), then write and close the figure."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
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
    for path in plots:
        lines += [f"## {PLOTS[path.name]}", "", f"![{PLOTS[path.name]}](plots/{path.name})", ""]
    run.report_file.write_text("\n".join(lines))
    return run.report_file


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"
