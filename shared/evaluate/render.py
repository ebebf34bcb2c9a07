"""Output of an evaluation: its tables (one model, two renderings), JSON, and the Markdown report.

`tables(result)` builds every table once, as `Table`s of plain strings; `console_tables` turns
them into rich tables (for `spikefed-evaluate` and `spikefed-run`) and `markdown` writes the same
tables into the report's sections, so a figure reads the same on the console and in report.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Table:
    """One table of an evaluation: its title, column headers and rows of cell texts. `notes`
    follow it (a caption on the console, paragraphs in Markdown)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _one_decimal(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def figures_table(result: dict[str, Any]) -> Table:
    """Accuracy, loss, the integer engine and the chip's energy per sample."""
    integer, chip = result["integer"], result["neurocore"]
    rows = [("accuracy", _pct(result["accuracy"])), ("loss", f"{result['loss']:.4f}")]
    if integer["samples"]:
        rows += [("integer engine accuracy", _pct(integer["accuracy"])),
                 ("integer engine bit-exact", f"{integer['bit_exact']} ({integer['mismatches']} "
                  f"of {integer['samples']} samples differ)")]
    else:
        rows.append(("integer engine", integer.get("note", "-")))
    rows += [
        (f"inference energy per sample ({chip['chip']})",
         f"{chip['inference_energy_per_sample_j'] * 1e6:.3f} µJ"),
        ("training-step energy per sample", f"{chip['train_energy_per_sample_j'] * 1e6:.3f} µJ"),
        (f"training-step DRAM bytes (batch {chip['batch']})", f"{chip['dram_bytes']:,}"),
    ]
    return Table(f"global model: {Path(result['checkpoint']).name} "
                 f"({result['kind']}, {result['model']['name']}, {result['dataset']})",
                 ("figure", "value"), tuple(rows))


def sweep_table(result: dict[str, Any]) -> Table:
    """Accuracy over time steps (ANN column: the QC-ANN of a dual-phase conversion)."""
    dual = " (dual-phase conversion)" if result["conversion_source"] == "dual-phase" else ""
    rows = tuple((str(r["time_steps"]), _pct(r["ann_accuracy"]), _pct(r["snn_accuracy"]))
                 for r in result["conversion"])
    return Table(f"accuracy over time steps{dual}", ("T", "ANN", "SNN"), rows,
                 tuple(result["notes"]))


def _eps(value: float | None) -> str:
    from shared.attack.robustness import LINF, budget_label

    return "-" if value is None else budget_label(LINF, value)


def attacks_table(result: dict[str, Any]) -> Table:
    """One row per attack and eps, then the attacks skipped with their reason."""
    rows = [(r["name"], _eps(r["eps"]), _pct(r["success_rate"]), _one_decimal(r["mean_l0"]),
             _one_decimal(r["median_l0"]), str(r["samples"])) for r in result["attacks"]]
    rows += [(r["name"], "-", f"skipped: {r['reason']}", "", "", "")
             for r in result["skipped_attacks"]]
    return Table("attacks (success over correctly classified inputs)",
                 ("attack", "eps", "success", "mean L0", "median L0", "inputs"), tuple(rows))


def robustness_table(result: dict[str, Any]) -> Table:
    """Robust accuracy per attack (rows) and budget (columns), then the worst case per input
    over every attack; the headline budget is marked with *."""
    from shared.attack.robustness import budget_label

    robust = result["robustness"]
    threat = robust["threat"]
    curve = robust["curve"]
    columns = [c["budget"] for c in curve]
    header = tuple(budget_label(threat, b) + (" *" if b == robust["budget"] else "")
                   for b in columns)
    cells: dict[str, dict[Any, str]] = {}
    if threat == "linf":
        for r in result["attacks"]:
            if r["eps"] is not None:
                cells.setdefault(r["name"], {})[r["eps"]] = _pct(r["robust_accuracy"])
    else:  # sparse attacks: robust accuracy within each L0 budget
        n, attempted = robust["correct"], robust["samples"]
        for r in result["attacks"]:
            if r["eps"] is None and "budget_success" in r:
                row = cells.setdefault(r["name"], {})
                for b in columns:
                    rate = (r["success_rate"] if b is None
                            else r["budget_success"].get(budget_label(threat, b)))
                    if rate is not None:
                        row[b] = _pct((n - rate * n) / attempted if attempted else 0.0)
    rows = [(name, *(by.get(b, "-") for b in columns)) for name, by in cells.items()]
    rows.append(("worst case", *(_pct(c["robust_accuracy"]) for c in curve)))
    rows.append(("worst attack", *(c["worst_attack"] or "-" for c in curve)))
    headline = robust["robust_accuracy"]
    title = (f"robust accuracy {_pct(headline)} at {robust['budget_label']} (clean "
             f"{_pct(robust['clean_accuracy'])}, {robust['samples']} inputs, worst case per input)")
    return Table(title, ("attack", *header), tuple(rows), tuple(robust.get("notes", ())))


def checks_table(result: dict[str, Any]) -> Table:
    """The sanity checks against gradient masking: pass / warn and what they measured."""
    rows = tuple((name, check["status"], check["detail"])
                 for name, check in result["robustness"]["checks"].items())
    return Table("robustness checks", ("check", "status", "measured"), rows)


def energy_table(result: dict[str, Any]) -> Table:
    """Energy, cycles and DRAM bytes of one training step on the chip model, by phase."""
    chip = result["neurocore"]
    rows = tuple((phase.upper(), f"{v['energy_j'] * 1e6:.3f}", f"{int(v['cycles']):,}",
                  f"{int(v['dram_bytes']):,}") for phase, v in chip["by_phase"].items())
    return Table(f"training step on the chip model ({chip['chip']}, batch {chip['batch']})",
                 ("phase", "energy (µJ)", "cycles", "DRAM bytes"), rows)


def tables(result: dict[str, Any]) -> list[Table]:
    """Every table of an evaluation, in report order (the robustness tables when attacks ran)."""
    robust = [robustness_table(result), checks_table(result)] if result.get("robustness") else []
    return [figures_table(result), sweep_table(result), attacks_table(result), *robust,
            energy_table(result)]


def console_table(table: Table) -> Any:
    """A rich table: the first column left-aligned, the figures right-aligned."""
    from rich.table import Table as RichTable

    out = RichTable(title=table.title, caption="; ".join(table.notes) or None)
    for i, column in enumerate(table.columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in table.rows:
        out.add_row(*row)
    return out


def console_tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables of an evaluation (shared by `spikefed-evaluate` and `spikefed-run`)."""
    return [console_table(table) for table in tables(result)]


def markdown_table(table: Table) -> list[str]:
    """The lines of a Markdown table, then its notes as paragraphs."""
    return [
        _markdown_row(table.columns),
        "|" + "---|" * len(table.columns),
        *(_markdown_row(row) for row in table.rows),
        *(f"\n{note}" for note in table.notes),
    ]


def _markdown_row(cells: tuple[str, ...]) -> str:
    return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)


def markdown(result: dict[str, Any]) -> str:
    """The report: a heading and a sentence on the model, then each table in its section."""
    figures, sweep, attacks, *robust, energy = tables(result)
    chip = result["neurocore"]
    dual = " (dual-phase conversion)" if result["conversion_source"] == "dual-phase" else ""
    lines = [
        f"# Evaluation of {Path(result['checkpoint']).name}",
        "",
        f"Model {result['model']['name']} ({result['kind']}, T={result['model']['time_steps']}, "
        f"weight bits {result['model'].get('weight_bits', 32)}) on {result['dataset']} "
        f"({result['test_samples']} test samples), round {result['round']}.",
        "",
        *markdown_table(figures),
        "",
        f"## Accuracy over time steps{dual}",
        "",
        *markdown_table(sweep),
        "",
        "![accuracy vs T](plots/accuracy_vs_time_steps.png)",
        "",
        "## Attacks",
        "",
        "Success rate over the inputs the deployed model classifies correctly; gradients from a "
        "differentiable view of the model, success judged on the deployed model.",
        "",
        *markdown_table(attacks),
        "",
        "![attack success vs eps](plots/attack_success_vs_eps.png)",
        "",
        *_robustness_section(robust),
        "## Energy on the chip model",
        "",
        f"One training step on {chip['batch']} test samples, chip preset `{chip['chip']}` "
        f"({chip['note']}).",
        "",
        *markdown_table(energy),
        "",
        "![energy breakdown](plots/energy_breakdown.png)",
        "",
    ]
    return "\n".join(lines)


def _robustness_section(robust: list[Table]) -> list[str]:
    if not robust:
        return []
    curve, checks = robust
    return [
        "## Robustness",
        "",
        "Robust accuracy over all inputs tried (a misclassified clean input counts as not "
        "robust): per attack, and the worst case per input over every attack run; * marks the "
        "dataset's standard budget, the headline. Then the checks against gradient masking "
        "(Carlini et al. 2019).",
        "",
        f"**{curve.title}**",
        "",
        *markdown_table(curve),
        "",
        *markdown_table(checks),
        "",
    ]


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """The result dict as indented JSON at `path` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """A Markdown report at `path` with its plots in `<path's dir>/plots/` (PNG)."""
    path = Path(path)
    plots = path.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    _plot_figures(result, plots)
    path.write_text(markdown(result))
    return path


def _plot_figures(result: dict[str, Any], plots: Path) -> None:
    """accuracy_vs_time_steps.png, attack_success_vs_eps.png, energy_breakdown.png in `plots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    rows = result["conversion"]
    ts = [r["time_steps"] for r in rows]
    ax.plot(ts, [100 * r["snn_accuracy"] for r in rows], "o-", label="SNN")
    if any(r["ann_accuracy"] is not None for r in rows):
        ax.plot(ts, [100 * (r["ann_accuracy"] or 0) for r in rows], "s--", label="QC-ANN")
    ax.set(xscale="log", xlabel="time steps T", ylabel="test accuracy (%)",
           title="accuracy vs T")
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_time_steps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    dense = [r for r in result["attacks"] if r["eps"] is not None]
    for name in dict.fromkeys(r["name"] for r in dense):
        pts = [(r["eps"] * 255, 100 * r["success_rate"]) for r in dense if r["name"] == name]
        ax.plot(*zip(*pts, strict=True), "o-", label=name)
    ax.set(xlabel="eps (x/255)", ylabel="success rate (%)", ylim=(0, 105),
           title="attack success vs eps")
    if dense:
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "attack_success_vs_eps.png", dpi=120)
    plt.close(fig)

    chip = result["neurocore"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    layers = list(chip["by_layer"])
    left = [0.0] * len(layers)
    for phase in ("fp", "bp", "wg"):
        values = [chip["by_layer"][layer].get(phase, 0.0) * 1e6 for layer in layers]
        ax.barh(layers, values, left=left, label=phase.upper())
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set(xlabel="energy per training step (µJ)", title=f"energy by layer ({chip['chip']})")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "energy_breakdown.png", dpi=120)
    plt.close(fig)
