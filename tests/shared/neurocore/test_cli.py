"""python -m shared.neurocore: reports and plots from the command line; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.data import load_dataset
from shared.neurocore import ChipConfig, NeuroCore
from shared.neurocore.__main__ import main as cli_main
from shared.rebuild import build_from_spec
from shared.snn import federated_state, model_layout

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
        (["--weight-bits", "9"], "--weight-bits 9: weight bits must be an integer in 2..8"),
        (["--checkpoint", "missing.safetensors"], "missing.safetensors"),
        (["--out"], "expected one argument (see --help)"),
    ],
)
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_command_line_profiles_a_trained_checkpoint(tmp_path):
    spec = {"name": "mlp", "in_channels": 1, "num_classes": 10, "input_size": 8,
            "time_steps": 2, "neuron": "lif", "surrogate": "atan", "weight_bits": 4}
    torch.manual_seed(3)
    trained = build_from_spec(spec)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(2.0)  # weights no fresh model of any seed has
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "round-002.safetensors", federated_state(trained),
                    {"round": 2, "model": spec, "dataset": "digits"})
    out = tmp_path / "nc"
    args = ["--model", "csnn", "--time-steps", "5", "--batch-size", "4", "--no-plots", "--cores",
            "1,2", "--out", str(out)]
    assert cli_main([*args, "--checkpoint", str(run)]) == 0  # a run directory: its newest round
    data = json.loads((out / "report.json").read_text())
    assert data["model_spec"] == spec and data["dataset"] == "digits" and data["time_steps"] == 2
    assert not (out / "energy_by_phase.png").exists()
    chip = NeuroCore(ChipConfig.preset("paper-28nm-fp16"))
    x, y = load_dataset("digits", "test").tensors
    expected = chip.profile(trained, model_layout(x[:4]), y[:4])
    assert data["energy_j"] == expected.energy_j and data["rows"] == json.loads(
        json.dumps(expected.rows))


def test_the_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "shared.neurocore", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python -m shared.neurocore" in done.stdout and "--checkpoint" in done.stdout
