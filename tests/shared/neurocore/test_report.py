"""shared.neurocore.report: the report's totals, report.json and rows.csv."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from shared.neurocore import ChipConfig, NeuroCore
from shared.neurocore.report import ROW_FIELDS
from shared.snn import build_model

EDGE = ChipConfig.preset("edge-int8")


@pytest.fixture(scope="module")
def step(rand_batch):
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    return model, rand_batch((4, 1, 8, 8), seed=1), torch.arange(4)


def test_report_files_hold_every_row_and_the_chips_factor(step, tmp_path):
    chip = NeuroCore(EDGE)
    report = chip.profile(*step)
    paths = report.write(tmp_path / "r", extra={"run": "test"})
    assert [p.name for p in paths] == ["report.json", "rows.csv"]
    data = json.loads(paths[0].read_text())
    assert data["estimate"] is True and data["run"] == "test"
    assert data["config"] == EDGE.model_dump()
    assert data["core_energy_scale"] == chip.energy_scale
    assert data["energy_constants"]["core_energy_scale"]["value"] == chip.energy_scale
    assert data["energy_j"] == report.energy_j and data["cycles"] == report.cycles
    assert data["seconds"] == report.cycles / (EDGE.clock_mhz * 1e6)
    assert data["dram_reduction"] == pytest.approx(1 - report.dram_bytes / report.gpu_dram_bytes)
    assert data["rows"] == report.rows
    with paths[1].open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ROW_FIELDS
    assert [(r["layer"], r["phase"], int(r["time_step"])) for r in rows] == [
        (r["layer"], r["phase"], r["time_step"]) for r in report.rows]
    assert sum(float(r["energy_j"]) for r in rows) == pytest.approx(report.energy_j)


def test_the_notes_follow_the_configuration(step):
    mask = NeuroCore(EDGE.replace(membrane="mask")).profile(*step)
    store = NeuroCore(EDGE).profile(*step)
    assert any("membrane='mask'" in note for note in mask.meta["notes"])
    assert not any("membrane='mask'" in note for note in store.meta["notes"])
    assert mask.meta["counted_once"] and all(
        layer in mask.meta["notes"][1] for layer in mask.meta["counted_once"])
