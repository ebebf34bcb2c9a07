"""shared.evaluate.pipeline: the whole evaluation on small trained checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.data import load_dataset
from shared.evaluate import EvalOptions, evaluate_checkpoint, write_json, write_report
from shared.evaluate.pipeline import integer_check, run_attacks
from shared.rebuild import converted_metadata, load_global_model
from shared.snn.inference import evaluate_model

SPEC_KEYS = {"accuracy", "integer", "conversion", "attacks", "neurocore"}
ROW_KEYS = {"name", "eps", "success_rate", "mean_l0", "median_l0", "samples"}


def test_pipeline_reports_every_spec_key(checkpoint, tmp_path):
    options = EvalOptions(time_steps=(1, 2, 4), attacks=("pgd-pdsg", "pgd-atan", "sda"),
                          eps=(8 / 255,), budget=32 / 255, samples=40, exact_samples=1000,
                          restarts=1, checks=False)
    stages = []
    result = evaluate_checkpoint(checkpoint, options, on_stage=stages.append)
    assert SPEC_KEYS <= result.keys()
    assert result["accuracy"] > 0.5  # trained far beyond chance (0.1)
    integer = result["integer"]
    assert integer["bit_exact"] is True and integer["mismatches"] == 0
    assert integer["samples"] == 1000  # digits' 360 test images topped up from the train split
    assert integer["accuracy"] == pytest.approx(result["accuracy"])  # bit-exact -> same argmax
    assert [r["time_steps"] for r in result["conversion"]] == [1, 2, 4]
    native = next(r for r in result["conversion"] if r["time_steps"] == 2)
    assert native["snn_accuracy"] == pytest.approx(result["accuracy"])
    names = {(r["name"], r["eps"]) for r in result["attacks"]}
    assert names == {(n, e) for n in ("pgd-pdsg", "pgd-atan") for e in (8 / 255, 32 / 255)}
    for row in result["attacks"]:
        assert 0.0 <= row["success_rate"] <= 1.0 and row["samples"] > 0
        assert ROW_KEYS | {"attempted", "robust_accuracy"} <= row.keys()
        assert row["attempted"] == 40
        assert row["mean_l0"] is None  # L0 is the figure of sparse attacks only
    big = {r["name"]: r["success_rate"] for r in result["attacks"] if r["eps"] == 32 / 255}
    assert big["pgd-pdsg"] > 0  # a 32/255 L-inf ball fools a 4-step digits net on some inputs
    assert [s["name"] for s in result["skipped_attacks"]] == ["sda"]  # images, not events
    robust = result["robustness"]
    assert robust["budget"] == 32 / 255 and robust["worst_attack"] in ("pgd-pdsg", "pgd-atan")
    worst = robust["robust_accuracy"]
    at_budget = [r["robust_accuracy"] for r in result["attacks"] if r["eps"] == 32 / 255]
    assert worst <= min(at_budget) and worst < result["accuracy"]
    assert {"pgd_vs_fgsm", "gradient_free"}.isdisjoint(robust["checks"])  # no FGSM, no square
    assert robust["checks"]["success_rises"]["status"] in ("pass", "warn")
    chip = result["neurocore"]
    assert chip["energy_j"] > chip["inference_energy_j"] > 0 and chip["dram_bytes"] > 0
    assert "integer engine" in stages and "chip model" in stages

    report = write_report(result, tmp_path / "eval" / "report.md")
    text = report.read_text()
    for png in ("accuracy_vs_time_steps", "attack_success_vs_eps", "energy_breakdown"):
        plot = tmp_path / "eval" / "plots" / f"{png}.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}.png" in text
    back = json.loads(write_json(result, tmp_path / "eval.json").read_text())
    assert back["integer"] == integer


@pytest.mark.slow
def test_event_model_gets_sparse_attacks_and_its_own_time_steps(train_checkpoint, tmp_path):
    path = train_checkpoint(tmp_path / "round-001.safetensors", dataset="dvs-digits", steps=30)
    options = EvalOptions(time_steps=(2, 8), attacks=("sda", "topk", "pgd-pdsg"), samples=6,
                          exact_samples=10)
    result = evaluate_checkpoint(path, options)
    assert result["accuracy"] > 0.5
    assert result["integer"]["bit_exact"] is True and result["integer"]["samples"] == 1000
    assert [r["time_steps"] for r in result["conversion"]] == [8]  # the frames' own T
    assert result["notes"] == ["T=2 skipped: event frames come with T=8"]
    rows = {r["name"]: r for r in result["attacks"]}
    assert set(rows) == {"sda", "topk"} and rows["sda"]["eps"] is None
    for row in rows.values():
        assert 0.0 <= row["success_rate"] <= 1.0 and row["samples"] > 0
        assert row.keys() == ROW_KEYS | {"attempted", "median_l0_percent", "passes_per_sample",
                                         "budget_success"}
        if row["mean_l0"] is not None:
            assert row["median_l0"] >= 1 and row["passes_per_sample"] > 0
    assert [s["name"] for s in result["skipped_attacks"]] == ["pgd-pdsg"]
    robust = result["robustness"]
    assert robust["threat"] == "l0" and robust["budget"] == 0.0025
    assert set(robust["checks"]) == {"success_rises", "large_budget"}


def test_qann_checkpoint_gets_a_conversion_sweep_and_its_snn_is_evaluable(train_checkpoint,
                                                                          tmp_path):
    from shared.convert import dual_phase_convert

    path = train_checkpoint(tmp_path / "round-001.safetensors", train_mode="qann", steps=40)
    options = EvalOptions(time_steps=(1, 2), attacks=("pgd-pdsg",), eps=(), budget=16 / 255,
                          samples=20, restarts=1, checks=False)
    result = evaluate_checkpoint(path, options)
    assert result["kind"] == "qann" and result["conversion_source"] == "dual-phase"
    assert [r["time_steps"] for r in result["conversion"]] == [1, 2]
    for row in result["conversion"]:
        assert row["ann_accuracy"] == pytest.approx(result["accuracy"])
        assert 0 <= row["snn_accuracy"] <= 1
    at_l = result["conversion"][1]  # T = the L the QC-ANN was trained for: near-lossless
    assert abs(at_l["snn_accuracy"] - at_l["ann_accuracy"]) < 0.03
    assert result["integer"]["samples"] == 0 and "qann" in result["integer"]["note"]
    assert result["attacks"][0]["samples"] > 0 and result["neurocore"]["energy_j"] > 0

    # the server's converted checkpoint (snn-round-NNN) evaluates at the T it was calibrated for
    gm = load_global_model(path)
    snn, _ = dual_phase_convert(gm.model, load_dataset("digits", "train"), 2, stages=False)
    converted = save_checkpoint(tmp_path / "snn-round-001.safetensors", snn.state_dict(), {
        **gm.meta, "ann_accuracy": result["accuracy"], **converted_metadata(gm.model, snn)})
    again = evaluate_checkpoint(converted, EvalOptions(time_steps=(2, 4), attacks=()))
    assert again["kind"] == "converted-snn"
    assert [r["time_steps"] for r in again["conversion"]] == [2]
    assert again["conversion"][0]["snn_accuracy"] == pytest.approx(again["accuracy"])
    assert "T=4 skipped" in again["notes"][0]


def test_attacks_leave_the_model_unchanged(checkpoint):
    gm = load_global_model(checkpoint)
    before = {k: v.clone() for k, v in gm.model.state_dict().items()}
    test = load_dataset("digits", "test")
    _, _, robust = run_attacks(gm, test, EvalOptions(attacks=("fgsm-pdsg", "square"), eps=(),
                                                     budget=16 / 255, samples=20, queries=10))
    assert robust["budget"] == 16 / 255 and "gradient_free" in robust["checks"]
    after = gm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not gm.model.training


def test_float_model_has_no_integer_engine(train_checkpoint, tmp_path):
    path = train_checkpoint(tmp_path / "round-001.safetensors", weight_bits=32, steps=5)
    gm = load_global_model(path)
    out = integer_check(gm, load_dataset("digits", "test"), load_dataset("digits", "train"), 100)
    assert out["samples"] == 0 and out["bit_exact"] is None and "weight-bits=32" in out["note"]


def test_run_directory_resolves_to_its_newest_checkpoint(checkpoint):
    gm = load_global_model(checkpoint.parent)
    assert gm.path == checkpoint
    _, accuracy = evaluate_model(gm.model, load_dataset("digits", "test"))
    assert accuracy > 0.5
