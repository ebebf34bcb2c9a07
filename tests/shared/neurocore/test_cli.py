"""python -m shared.neurocore: reports and plots from the command line; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.neurocore.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[3]


def test_command_line_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "nc"
    code = cli_main(["--model", "mlp", "--dataset", "digits", "--batch-size", "8",
                     "--time-steps", "2", "--cores", "1,4,2", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert data["estimate"] and data["rows"]
    assert [e["cores"] for e in data["core_sweep"]] == [1, 2, 4]
    assert data["calibration"]["dense_workload_tflops_per_w_fp16"] == pytest.approx(1.05, rel=0.05)
    for name in ("rows.csv", "core_scaling.csv", "energy_by_phase.png", "core_scaling.png",
                 "sparsity_heatmap.png", "dram_vs_gpu.png"):
        assert (out / name).stat().st_size > 0
    assert "less" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cores", "0,2"], "core counts must be >= 1"),
        (["--cores", "two"], "not a comma-separated list"),
        (["--preset", "gpu"], "unknown chip preset 'gpu'"),
        (["--precision", "fp8"], "precision='fp8' is not allowed"),
        (["--model", "vgg"], "--model 'vgg' is not one of"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--chip-cores", "0"], "cores=0 is not allowed"),
    ],
)
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    assert cli_main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "shared.neurocore", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python -m shared.neurocore" in done.stdout and "--checkpoint" in done.stdout
