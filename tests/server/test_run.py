"""spikefed-run end to end: real Flower simulations (Ray actors) and the CLI's user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.run import cli
from shared.checkpoint import load_checkpoint
from shared.rundir import find_checkpoints

HISTORY_KEYS = {"round", "accuracy", "loss", "clients", "bytes_up", "bytes_down", "energy_j",
                "cycles", "dram_bytes", "duration_s", "rejected"}
SMALL = "dataset=digits time-steps=2 local-epochs=1 chip=none"


def spikefed_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "server.run", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--run-config", "time-step=4"], "unknown key 'time-step'"),
        (["--run-config", "time-steps=-3"], "time-steps=-3 is not allowed"),
        (["--run-config", "dataset=imagenet"], "unknown dataset 'imagenet'"),
        (["--run-config", "dataset=mnist data-dir=/nonexistent/dir"], "/nonexistent/dir"),
        (["--resume"], "--resume needs --out"),
        (["--clients", "2", "--byzantine", "3"], "--byzantine 3 exceeds --clients 2"),
        (["--byzantine", "1", "--byzantine-kind", "flip"], "choose one of nan, sign-flip"),
        (["--run-config", "strategy=bulyan"], "bulyan with krum-malicious=1 needs at least 7"),
        (["--run-config", "dp-noise-multiplier=1"], "needs dp-clipping-norm > 0"),
        (["--metrics-linger", "nan"], "--metrics-linger nan is not a finite number"),
        (["--run-config", "seed=-1"], "seed=-1 is not allowed"),
        (["--run-config", "round-timeout=inf"], "round-timeout=inf is not allowed"),
        (["--run-config", "num-server-rounds=true"], "num-server-rounds=True is not allowed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(invoke, args, needle):
    result = invoke(cli, *args)  # in-process: the checks run before any simulation starts
    assert result.code == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_without_checkpoint_is_one_line(invoke, tmp_path):
    result = invoke(cli, "--out", str(tmp_path / "empty"), "--resume")
    assert result.code == 2
    assert "no valid checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_a_second_run_into_a_directory_in_use_is_refused_in_one_line(invoke, tmp_path):
    from shared.rundir import RunDir

    out = tmp_path / "busy"
    with RunDir(out).lock():  # another run holds it
        result = invoke(cli, "--out", str(out), "--run-config", SMALL, "--metrics-port", "0")
    assert result.code == 2, result.stderr
    assert "in use by another run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_default_run_names_are_unique_and_a_refused_start_leaves_no_directory(
    invoke, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert invoke(cli, "--run-config", "time-step=4").code == 2
    assert not list((tmp_path / "runs").iterdir())  # the two refused starts made nothing


def test_the_module_entry_point_reports_bad_input_in_one_line():
    result = spikefed_run("--run-config", "time-step=4")  # `python -m server.run`, for real
    assert result.returncode == 2 and "unknown key 'time-step'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One 3-client, 2-round run with the default config (one local epoch instead of three: the
    tests read the run's files, not its accuracy), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("quick") / "run"
    return out, spikefed_run("--clients", "3", "--rounds", "2", "--out", str(out),
                             "--run-config", "local-epochs=1")


@pytest.mark.slow
def test_three_clients_two_rounds_writes_run_directory(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["final_accuracy"] > 0.5  # two rounds on mnist-subset learn far beyond chance
    assert summary["config"]["num-server-rounds"] == 2 and summary["config"]["min-clients"] == 3
    assert [e["round"] for e in summary["history"]] == [1, 2]
    for entry in summary["history"]:
        assert HISTORY_KEYS <= entry.keys()
        assert entry["clients"] == 3 and entry["bytes_up"] > 0 and entry["bytes_down"] > 0
        assert entry["energy_j"] > 0 and entry["cycles"] > 0 and entry["dram_bytes"] > 0
    chip = json.loads((out / "neurocore" / "report.json").read_text())
    assert chip["round"] == 2 and chip["rows"] and chip["energy_j"] > 0
    assert summary["neurocore"]["dram_reduction"] == chip["dram_reduction"]
    assert (out / "neurocore" / "rows.csv").is_file()
    assert (out / "neurocore" / "energy_by_phase.png").is_file()
    checkpoints = find_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["round-001.safetensors", "round-002.safetensors"]
    _, meta = load_checkpoint(checkpoints[-1])
    assert meta["accuracy"] == summary["final_accuracy"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert "final accuracy" in result.stdout
    assert "metrics: http://127.0.0.1:" in result.stdout  # the exporter is on by default
    assert all(e["rejected"] == 0 for e in summary["history"]) and summary["rejected_updates"] == 0
    assert {p.name for p in (out / "plots").iterdir()} == {
        "accuracy_loss.png", "energy_dram.png", "bytes.png"}
    assert "](plots/accuracy_loss.png)" in (out / "report.md").read_text()


EVALUATION_KEYS = {"accuracy", "integer", "conversion", "attacks", "neurocore"}


@pytest.mark.slow
def test_run_ends_with_the_final_evaluation(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stdout + result.stderr
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert EVALUATION_KEYS <= evaluation.keys()
    assert evaluation["checkpoint"].endswith("round-002.safetensors")
    summary = json.loads((out / "summary.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(summary["final_accuracy"])
    integer = evaluation["integer"]
    assert integer["bit_exact"] is True and integer["mismatches"] == 0
    assert integer["samples"] >= 1000
    assert evaluation["attacks"] and all(0 <= a["success_rate"] <= 1 for a in evaluation["attacks"])
    assert evaluation["neurocore"]["energy_j"] > 0
    assert (out / "evaluation" / "report.md").is_file()
    assert "(evaluation/report.md)" in (out / "report.md").read_text()
    assert "integer engine bit-exact" in result.stdout  # the table is printed


@pytest.mark.slow
def test_evaluate_command_on_the_run(quick_run, tmp_path):
    out, _ = quick_run
    result = subprocess.run(
        [sys.executable, "-m", "shared.evaluate", str(out), "--time-steps", "2,4",
         "--attacks", "fgsm-pdsg,pgd-sigmoid", "--eps", "16/255", "--samples", "50",
         "--json", str(tmp_path / "eval.json"), "--report", str(tmp_path / "report.md")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert EVALUATION_KEYS <= evaluation.keys()
    assert [c["time_steps"] for c in evaluation["conversion"]] == [2, 4]
    assert {"fgsm-pdsg", "pgd-sigmoid"} <= {a["name"] for a in evaluation["attacks"]}
    assert all(0 <= a["success_rate"] <= 1 for a in evaluation["attacks"])
    for png in ("accuracy_vs_time_steps", "attack_success_vs_eps", "energy_breakdown"):
        assert (tmp_path / "plots" / f"{png}.png").stat().st_size > 1000
    assert "integer engine bit-exact" in result.stdout and "pgd-sigmoid" in result.stdout


@pytest.mark.slow
def test_resume_continues_after_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    small = ["--clients", "2", "--out", str(out), "--run-config",
             "dataset=digits time-steps=2 local-epochs=1", "--no-evaluate"]
    first = spikefed_run(*small, "--rounds", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    again = spikefed_run(*small, "--rounds", "2")
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent overwrite

    newest = out / "checkpoints" / "round-002.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-write of round 2's weights
    resumed = spikefed_run(*small, "--rounds", "3", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "round-002.safetensors is corrupt" in resumed.stdout + resumed.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(line)["round"] for line in lines]
    assert rounds == [1, 2, 3]  # round 2 redone once from round 1's checkpoint, none repeated
    summary = json.loads((out / "summary.json").read_text())
    assert [e["round"] for e in summary["history"]] == [1, 2, 3]
    load_checkpoint(out / "checkpoints" / "round-002.safetensors")  # rewritten, valid again


@pytest.mark.slow
def test_nan_client_is_rejected_every_round_and_the_run_finishes(tmp_path):
    out = tmp_path / "nan"
    result = spikefed_run("--clients", "3", "--rounds", "2", "--out", str(out),
                          "--byzantine", "1", "--byzantine-kind", "nan", "--run-config", SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected_updates"] == 2
    assert summary["byzantine"] == {"nodes": 1, "kind": "nan"}
    for entry in summary["history"]:
        assert entry["clients"] == 2 and entry["rejected"] == 1
        assert entry["rejected_reasons"] == {"non-finite": 1}
    assert summary["final_accuracy"] > summary["initial"]["accuracy"]  # the others still learn
    assert "rejected the update of node" in result.stderr


@pytest.mark.slow
def test_round_with_every_update_rejected_keeps_the_global_model(tmp_path):
    out = tmp_path / "all-nan"
    result = spikefed_run("--clients", "2", "--rounds", "1", "--out", str(out),
                          "--byzantine", "2", "--byzantine-kind", "nan", "--run-config", SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["history"]
    assert entry["rejected"] == 2 and entry["clients"] == 0
    assert entry["loss"] == summary["initial"]["loss"]  # the very same model, evaluated again
    assert entry["accuracy"] == summary["initial"]["accuracy"]
