"""train-mode qann: clients train the clip-quantize ANN; the server converts it to an SNN."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.checkpoint import load_checkpoint
from shared.config import ConfigError, RunConfig
from shared.convert import QCActivation
from shared.data import load_dataset
from shared.rebuild import build_from_spec, load_converted
from shared.rundir import find_checkpoints
from shared.snn import evaluate_model


def test_train_mode_is_validated_and_builds_the_qc_ann():
    with pytest.raises(ConfigError, match="train-mode='ann' is not allowed"):
        RunConfig.parse({"train-mode": "ann"})
    config = RunConfig.parse({"train-mode": "qann", "time-steps": 2})
    model = build_from_spec(config.model_spec())
    levels = {m.levels for m in model.modules() if isinstance(m, QCActivation)}
    assert levels == {2}
    assert RunConfig.parse({}).model_spec().get("train_mode") is None  # snn specs unchanged


@pytest.mark.slow
def test_qann_federation_of_five_clients_ends_with_an_snn_close_to_its_qc_ann(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "server.run", "--clients", "5", "--rounds", "3", "--out", str(out),
         "--run-config", "train-mode=qann local-epochs=1"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    conversion = summary["conversion"]
    assert conversion["time_steps"] == 4 and summary["config"]["train-mode"] == "qann"
    assert conversion["ann_accuracy"] == summary["final_accuracy"] > 0.8
    assert conversion["snn_accuracy"] >= conversion["ann_accuracy"] - 0.01  # within 1 point
    assert conversion["calibration_samples"] == 1024 and conversion["layers"]
    assert "converted SNN" in result.stdout
    assert summary["history"][-1]["energy_j"] > 0  # the chip accounts the QC-ANN's steps

    rounds = [p.name for p in find_checkpoints(out / "checkpoints")]
    assert rounds == ["round-001.safetensors", "round-002.safetensors", "round-003.safetensors"]
    tensors, meta = load_checkpoint(conversion["checkpoint"])
    assert meta["kind"] == "converted-snn" and meta["round"] == 3
    snn = load_converted(build_from_spec(meta["model"]), tensors, meta)
    _, accuracy = evaluate_model(snn, load_dataset("mnist-subset", "test"))
    assert accuracy == conversion["snn_accuracy"] == meta["accuracy"]
