"""shared.evaluate.render: one table model, rendered on the console and in the report."""

from __future__ import annotations

import copy
import json

import pytest

from shared.evaluate.render import console_tables, markdown, tables, write_json

RESULT = {
    "checkpoint": "runs/x/checkpoints/round-003.safetensors", "round": 3, "kind": "snn",
    "model": {"name": "csnn", "time_steps": 2, "weight_bits": 4}, "dataset": "digits",
    "test_samples": 360, "accuracy": 0.9, "loss": 0.31234,
    "integer": {"accuracy": 0.9, "bit_exact": True, "mismatches": 0, "samples": 1000},
    "conversion": [{"time_steps": 1, "ann_accuracy": None, "snn_accuracy": 0.5},
                   {"time_steps": 2, "ann_accuracy": None, "snn_accuracy": 0.9}],
    "conversion_source": "snn-time-sweep", "notes": ["T=8 skipped: event frames come with T=2"],
    "attacks": [{"name": "pgd-pdsg", "eps": 8 / 255, "success_rate": 0.25, "mean_l0": None,
                 "median_l0": None, "samples": 36, "attempted": 40},
                {"name": "sda", "eps": None, "success_rate": 1.0, "mean_l0": 12.5,
                 "median_l0": 12.0, "median_l0_percent": 0.1, "samples": 4, "attempted": 4,
                 "passes_per_sample": 88.0}],
    "skipped_attacks": [{"name": "topk", "reason": "needs binary event frames"}],
    "neurocore": {"chip": "edge-int8", "batch": 32, "energy_j": 3e-6, "dram_bytes": 123456,
                  "inference_energy_per_sample_j": 1e-7, "train_energy_per_sample_j": 9e-8,
                  "note": "estimates of a modelled chip",
                  "by_layer": {"conv1": {"fp": 1e-6, "bp": 2e-6}},
                  "by_phase": {"fp": {"energy_j": 1e-6, "cycles": 1000, "dram_bytes": 10},
                               "bp": {"energy_j": 2e-6, "cycles": 2000.0, "dram_bytes": 20}}},
}


def _qann_result() -> dict:
    result = copy.deepcopy(RESULT)
    result["kind"], result["conversion_source"], result["notes"] = "qann", "dual-phase", []
    result["integer"] = {"accuracy": None, "bit_exact": None, "mismatches": None, "samples": 0,
                         "note": "a qann model has no integer engine"}
    for row in result["conversion"]:
        row["ann_accuracy"] = 0.91
    return result


def _console_cells(table) -> list[tuple[str, ...]]:
    columns = [[str(cell) for cell in column.cells] for column in table.columns]
    return list(zip(*columns, strict=True))


def _markdown_tables(text: str) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
    """(header, rows) of every Markdown table in `text`, cells stripped."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            def cells(row: str) -> tuple[str, ...]:
                return tuple(cell.strip() for cell in row.strip()[1:-1].split("|"))
            rows = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
            found.append((cells(lines[i - 1]), rows))
    return found


@pytest.mark.parametrize("result", [RESULT, _qann_result()], ids=["snn", "qann"])
def test_console_and_markdown_show_the_same_rows(result):
    model = tables(result)
    console = console_tables(result)
    in_markdown = _markdown_tables(markdown(result))
    assert len(model) == len(console) == len(in_markdown) == 4
    for table, rich_table, (header, md_rows) in zip(model, console, in_markdown, strict=True):
        assert rich_table.title == table.title
        assert tuple(c.header for c in rich_table.columns) == table.columns == header
        assert rich_table.row_count == len(table.rows) == len(md_rows)
        assert _console_cells(rich_table) == list(table.rows) == md_rows


def test_tables_hold_the_figures_of_the_result():
    figures, sweep, attacks, energy = tables(RESULT)
    assert dict(figures.rows)["accuracy"] == "90.00 %"
    assert dict(figures.rows)["loss"] == "0.3123"
    assert dict(figures.rows)["integer engine bit-exact"] == "True (0 of 1000 samples differ)"
    assert dict(figures.rows)["inference energy per sample (edge-int8)"] == "0.100 µJ"
    assert dict(figures.rows)["training-step DRAM bytes (batch 32)"] == "123,456"
    assert "round-003.safetensors (snn, csnn, digits)" in figures.title
    assert sweep.rows == (("1", "-", "50.00 %"), ("2", "-", "90.00 %"))
    assert sweep.notes == ("T=8 skipped: event frames come with T=2",)
    assert attacks.rows == (
        ("pgd-pdsg", "8/255", "25.00 %", "-", "-", "36"),
        ("sda", "-", "100.00 %", "12.5", "12.0", "4"),
        ("topk", "-", "skipped: needs binary event frames", "", "", ""),
    )
    assert energy.rows == (("FP", "1.000", "1,000", "10"), ("BP", "2.000", "2,000", "20"))


def test_qann_tables_name_the_conversion_and_the_missing_engine():
    figures, sweep, _, _ = tables(_qann_result())
    assert dict(figures.rows)["integer engine"] == "a qann model has no integer engine"
    assert sweep.title.endswith("(dual-phase conversion)")
    assert all(row[1] == "91.00 %" for row in sweep.rows)


def test_report_has_its_sections_notes_and_plots():
    text = markdown(RESULT)
    assert text.startswith("# Evaluation of round-003.safetensors\n")
    assert "Model csnn (snn, T=2, weight bits 4) on digits (360 test samples), round 3." in text
    for heading in ("## Accuracy over time steps", "## Attacks", "## Energy on the chip model"):
        assert f"\n{heading}\n" in text
    assert "\nT=8 skipped: event frames come with T=2\n" in text
    assert "| topk | - | skipped: needs binary event frames | | | |" in text
    for png in ("accuracy_vs_time_steps", "attack_success_vs_eps", "energy_breakdown"):
        assert f"(plots/{png}.png)" in text
    assert "## Accuracy over time steps (dual-phase conversion)" in markdown(_qann_result())


def test_json_round_trips(tmp_path):
    path = write_json(RESULT, tmp_path / "deep" / "eval.json")
    assert json.loads(path.read_text()) == RESULT


def _robust_result() -> dict:
    result = copy.deepcopy(RESULT)
    result["attacks"] = [
        {"name": n, "eps": e, "success_rate": s, "robust_accuracy": r, "mean_l0": None,
         "median_l0": None, "samples": 36, "attempted": 40}
        for n, e, s, r in [("pgd-atan", 0.1, 0.5, 0.45), ("square", 0.1, 0.25, 0.675),
                           ("pgd-atan", 0.3, 1.0, 0.0), ("square", 0.3, 0.75, 0.225)]]
    result["robustness"] = {
        "threat": "linf", "budget": 0.3, "budget_label": "0.3", "robust_accuracy": 0.0,
        "clean_accuracy": 0.9, "worst_attack": "pgd-atan", "attacks": ["pgd-atan", "square"],
        "samples": 40, "correct": 36, "notes": [],
        "curve": [{"budget": 0.1, "robust_accuracy": 0.4, "worst_attack": "pgd-atan"},
                  {"budget": 0.3, "robust_accuracy": 0.0, "worst_attack": "pgd-atan"}],
        "checks": {"gradient_free": {"status": "warn", "figure": 0.05,
                                     "detail": "gradient masking likely: square +5.0 points"}}}
    return result


def test_robustness_tables_show_each_attack_the_worst_case_and_the_checks():
    result = _robust_result()
    model = tables(result)
    in_markdown = _markdown_tables(markdown(result))
    assert len(model) == len(in_markdown) == 6
    curve, checks = model[3], model[4]
    assert curve.columns == ("attack", "0.1", "0.3 *")
    assert curve.rows == (("pgd-atan", "45.00 %", "0.00 %"), ("square", "67.50 %", "22.50 %"),
                          ("worst case", "40.00 %", "0.00 %"),
                          ("worst attack", "pgd-atan", "pgd-atan"))
    assert "robust accuracy 0.00 % at 0.3" in curve.title
    assert checks.rows == (("gradient_free", "warn",
                            "gradient masking likely: square +5.0 points"),)
    for table, (header, rows) in zip(model, in_markdown, strict=True):
        assert table.columns == header and list(table.rows) == rows
    assert "## Robustness" in markdown(result)
