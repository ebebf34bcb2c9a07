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

PLOTS = {
    "accuracy_loss.png": "Global accuracy and loss per round",
    "energy_dram.png": "Neuromorphic chip energy and DRAM traffic per round",
    "bytes.png": "Bytes up and down per round",
}


def write_plots(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The three per-round plots of `summary` as PNG files in `out_dir`; none without rounds."""
    history = summary.get("history") or []
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rounds = [e["round"] for e in history]
    initial = summary.get("initial") or {}
    paths = []

    fig, acc_ax = plt.subplots(figsize=(6, 3.5))
    points = [initial, *history] if "accuracy" in initial else list(history)
    xs, acc, loss = ([e[k] for e in points] for k in ("round", "accuracy", "loss"))
    acc_ax.plot(xs, [100 * a for a in acc], "o-", color="#4c72b0", label="accuracy")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("test accuracy (%)", color="#4c72b0")
    loss_ax = acc_ax.twinx()
    loss_ax.plot(xs, loss, "s--", color="#dd8452", label="loss")
    loss_ax.set_ylabel("test loss", color="#dd8452")
    acc_ax.set_title(PLOTS["accuracy_loss.png"])
    paths.append(_save(plt, fig, out / "accuracy_loss.png"))

    fig, energy_ax = plt.subplots(figsize=(6, 3.5))
    energy_ax.bar(rounds, [e.get("energy_j", 0.0) * 1e3 for e in history], color="#55a868")
    energy_ax.set_xlabel("round")
    energy_ax.set_ylabel("chip energy (mJ)", color="#55a868")
    dram_ax = energy_ax.twinx()
    dram_ax.plot(rounds, [e.get("dram_bytes", 0) / 1e6 for e in history], "o-", color="#c44e52")
    dram_ax.set_ylabel("DRAM traffic (MB)", color="#c44e52")
    energy_ax.set_title(PLOTS["energy_dram.png"])
    paths.append(_save(plt, fig, out / "energy_dram.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.4
    ax.bar([r - width / 2 for r in rounds], [e["bytes_up"] / 1e6 for e in history], width,
           label="up (clients -> server)", color="#8172b3")
    ax.bar([r + width / 2 for r in rounds], [e["bytes_down"] / 1e6 for e in history], width,
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
    out = Path(out_dir)
    plots = write_plots(summary, out / "plots")
    config = summary.get("config") or {}
    history = summary.get("history") or []
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
        for e in history:
            lines.append(
                f"| {e['round']} | {_pct(e['accuracy'])} | {e['loss']:.3f} | {e['clients']} "
                f"| {e.get('failed', 0)} | {e.get('rejected', 0)} | {e['bytes_up'] / 1e6:.2f} "
                f"| {e['bytes_down'] / 1e6:.2f} | {e.get('energy_j', 0.0) * 1e3:.3f} "
                f"| {e.get('dram_bytes', 0) / 1e6:.2f} | {e['duration_s']:.1f} |"
            )
        lines.append("")
    for path in plots:
        lines += [f"## {PLOTS[path.name]}", "", f"![{PLOTS[path.name]}](plots/{path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"
