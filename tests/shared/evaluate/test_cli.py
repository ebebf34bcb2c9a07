"""spikefed-evaluate: the command in-process (tables, files, one-line user errors), and one
`python -m shared.evaluate` smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from shared.checkpoint import metadata_path, read_metadata, save_checkpoint
from shared.evaluate.cli import cli


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "round-001.safetensors"
    dst.write_bytes(checkpoint.read_bytes())
    metadata_path(dst).write_text(metadata_path(checkpoint).read_text())
    return dst


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _tamper(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _unknown_model(path):
    """Re-saved with a model name no zoo has (the metadata is hashed, so it is written anew)."""
    meta = read_metadata(path)
    meta["model"]["name"] = "vgg-99"
    save_checkpoint(path, load_file(path), meta)


def _edited_sidecar(path):
    meta = json.loads(metadata_path(path).read_text())
    meta["model"]["name"] = "vgg-99"
    metadata_path(path).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [(_truncate, "corrupt"), (_tamper, "corrupt"), (_unknown_model, "unknown model 'vgg-99'"),
     (_edited_sidecar, "it was edited"), (lambda p: p.unlink(), "does not exist")],
)
def test_bad_checkpoint_is_one_line_exit_2(invoke, checkpoint, tmp_path, damage, needle):
    path = _copy(checkpoint, tmp_path)
    damage(path)
    result = invoke(cli, str(path))
    assert result.code == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--eps", "-8/255"], "must lie in [0, 1]"), (["--attacks", "pgd-magic"], "unknown attack"),
     (["--time-steps", "0"], ">= 1"), (["--budget", "150%"], "must lie in [0, 1]"),
     (["--chip", "gpu9000"], "unknown chip preset")],
)
def test_bad_options_are_one_line_exit_2(invoke, checkpoint, args, needle):
    result = invoke(cli, str(checkpoint), "--attacks", "pgd-pdsg", *args)
    assert result.code == 2, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_command_prints_the_tables_and_writes_json_and_report(invoke, checkpoint, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke(cli, str(checkpoint), "--time-steps", "2", "--attacks", "fgsm-pdsg,sda",
                    "--eps", "16/255", "--budget", "16/255", "--samples", "10",
                    "--exact-samples", "10",
                    "--json", str(tmp_path / "eval.json"), "--report", str(tmp_path / "report.md"))
    assert result.code == 0, result.stdout + result.stderr
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert [a["name"] for a in evaluation["attacks"]] == ["fgsm-pdsg"]
    assert evaluation["options"]["eps"] == [16 / 255] and evaluation["options"]["samples"] == 10
    assert "integer engine bit-exact" in result.stdout and "fgsm-pdsg" in result.stdout
    assert "skipped: needs binary event frames" in result.stdout
    robust = evaluation["robustness"]
    assert robust["budget"] == 16 / 255 and 0 <= robust["robust_accuracy"] <= 1
    assert "robust accuracy" in result.stdout and "## Robustness" in (tmp_path /
                                                                     "report.md").read_text()
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots").is_dir()


def test_python_dash_m_runs_the_command(tmp_path):
    """The module entry point in a real process: a user error is one line and exit code 2."""
    missing = tmp_path / "round-009.safetensors"
    result = subprocess.run([sys.executable, "-m", "shared.evaluate", str(missing)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
