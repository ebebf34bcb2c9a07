"""Plots of a chip report (matplotlib, Agg backend): energy breakdown by phase, core scaling,
sparsity heatmap (layer x time step) and chip DRAM traffic against the A100 baseline."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from shared.neurocore.report import Report

PHASE_COLORS = {"fp": "#4c72b0", "bp": "#dd8452", "wg": "#55a868"}


def write_plots(
    report: Report, out_dir: str | Path, core_sweep: list[dict[str, Any]] | None = None
) -> list[Path]:
    """Write the plots as PNG files into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _energy_by_phase(plt, report, out / "energy_by_phase.png"),
        _sparsity_heatmap(plt, report, out / "sparsity_heatmap.png"),
    ]
    if core_sweep:
        paths.append(_core_scaling(plt, core_sweep, out / "core_scaling.png"))
    if report.gpu:
        paths.append(_dram_vs_gpu(plt, report, out / "dram_vs_gpu.png"))
    return paths


def _layers(report: Report) -> list[str]:
    return list(dict.fromkeys(row["layer"] for row in report.rows))


def _title(report: Report, what: str) -> str:
    cfg = report.config
    return (f"{what}: {report.meta.get('model', '')} T={report.meta.get('time_steps')} "
            f"B={report.meta.get('batch_size')}, {cfg.cores} cores {cfg.precision} "
            f"(estimate)")


def _energy_by_phase(plt: Any, report: Report, path: Path) -> Path:
    layers = _layers(report)
    energy: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PHASE_COLORS}
    for row in report.rows:
        energy[row["phase"]][row["layer"]] += row["energy_j"] * 1e6
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]}, constrained_layout=True
    )
    bottom = [0.0] * len(layers)
    for phase, color in PHASE_COLORS.items():
        values = [energy[phase][layer] for layer in layers]
        ax.bar(layers, values, bottom=bottom, color=color, label=phase.upper())
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("energy per training step (uJ)")
    ax.set_title(_title(report, "Energy by layer and phase"))
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    ax.legend()
    parts = report.cost.energy_by_part
    ax2.bar(list(parts), [v * 1e6 for v in parts.values()], color="#8172b3")
    ax2.set_title("by component")
    ax2.set_ylabel("uJ")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sparsity_heatmap(plt: Any, report: Report, path: Path) -> Path:
    """Nonzero fraction of each layer's FP input (spike rate for neurons) per time step."""
    rows = [r for r in report.rows if r["phase"] == "fp" and r["density"] is not None]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    steps = int(report.meta.get("time_steps") or 1)
    grid = [[float("nan")] * steps for _ in layers]
    index = {layer: i for i, layer in enumerate(layers)}
    for r in rows:
        grid[index[r["layer"]]][r["time_step"]] = r["density"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * steps, 1.2 + 0.35 * len(layers)),
                           constrained_layout=True)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xticks(range(steps))
    ax.set_xlabel("time step")
    ax.set_title("input density (FP) / spike rate (neurons)", fontsize=9)
    for i, row in enumerate(grid):
        for t, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(t, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _core_scaling(plt: Any, sweep: list[dict[str, Any]], path: Path) -> Path:
    cores = [e["cores"] for e in sweep]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.plot(cores, [e["cycles"] for e in sweep], "o-", label="step cycles")
    ax.plot(cores, [e["compute_cycles"] for e in sweep], "s--", label="compute (engines)")
    ax.plot(cores, [e["dram_cycles"] for e in sweep], "^:", label="DRAM bound")
    ax.set_xlabel("cores")
    ax.set_ylabel("cycles per training step")
    ax.set_yscale("log")
    ax.set_title("Core scaling (estimate)")
    ax.legend(loc="center right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(cores, [e["speedup"] for e in sweep], "k.-", alpha=0.4)
    ax2.set_ylabel("speed-up vs first point")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _dram_vs_gpu(plt: Any, report: Report, path: Path) -> Path:
    gpu = report.gpu or {}
    ledger = {k: (v["written"] + v["read"]) / 1e6 for k, v in report.cost.ledger.items()}
    groups = {  # the same three groups for both devices
        "input": (ledger["input"], gpu.get("input_bytes", 0) / 1e6),
        "saved / working state": (
            ledger["saved_state"] + ledger["working_state"],
            (gpu.get("saved_written_bytes", 0) + gpu.get("saved_read_bytes", 0)) / 1e6,
        ),
        "parameters, gradients, optimizer": (
            ledger["weights"] + ledger["gradients"] + ledger["optimizer_state"],
            gpu.get("parameter_bytes", 0) / 1e6,
        ),
    }
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    bottom = [0.0, 0.0]
    for (name, values), color in zip(groups.items(), ("#937860", "#c44e52", "#64b5cd"),
                                     strict=True):
        ax.bar([0, 1], values, bottom=bottom, color=color, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks([0, 1], ["chip", "A100 (eager PyTorch)"])
    ax.set_ylabel("DRAM MB per training step")
    reduction = report.dram_reduction
    ax.set_title(f"DRAM traffic: {reduction:.0%} less on the chip (estimate)"
                 if reduction is not None else "DRAM traffic")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
