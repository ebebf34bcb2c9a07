"""The stages of `spikefed-evaluate` and the pipeline that runs them, `evaluate_checkpoint`.

Every figure is measured on the test split, except the integer engine's exactness check, which
tops the test split up from the train split when the test split has fewer samples than asked for
(exactness needs inputs, not held-out labels). Attacks run through a differentiable view of the
model and are judged on the deployed model (the integer-in-float path for a quantized model);
`shared.attack.metrics` scores them, and `shared.attack.robustness` takes the worst case per
input over every attack at the dataset's budgets, with its checks against gradient masking.
A QC-ANN checkpoint gets the dual-phase conversion sweep instead of the sweep over T, and its
converted SNN is what the attacks and the chip see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from shared.errors import CheckpointError
from shared.rebuild import GlobalModel, load_global_model
from shared.snn import model_layout
from shared.snn.inference import dataset_tensors, evaluate_model

from .options import EvalOptions

if TYPE_CHECKING:
    from shared.attack import AttackSummary, Budgets


def _test_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the integer engine takes, what the float model takes) for dataset samples `x`."""
    if x.dim() == 5:  # event frames [N, T, C, H, W], binary
        return x.to(torch.uint8), x
    codes = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
    return codes, codes.float() / 255


@torch.no_grad()
def integer_check(gm: GlobalModel, test: TensorDataset, train: TensorDataset,
                  samples: int, batch_size: int = 500) -> dict[str, Any]:
    """Export the integer engine and compare its logits with the model's, bit for bit, on the whole
    test split, topped up from the train split to at least `samples` inputs.

    `bit_exact`: every logit of every compared sample equal (float64); `mismatches`: samples with
    any differing logit; `accuracy`: the engine's accuracy on the test split."""
    if not gm.quantized:
        why = ("weight-bits=32: a float model has no integer engine" if gm.kind == "snn" else
               f"a {gm.kind} model has no integer engine (quantized SNNs from train-mode=snn do)")
        return {"accuracy": None, "bit_exact": None, "mismatches": None, "samples": 0,
                "note": why}
    from shared.quant import to_integer

    engine = to_integer(gm.model)
    x_test, y_test = dataset_tensors(test)
    x_train, _ = dataset_tensors(train)
    x_all = torch.cat([x_test, x_train[: max(0, samples - len(x_test))]])  # >= the test split
    mismatches, correct, tested = 0, 0, 0
    for start in range(0, len(x_all), batch_size):
        codes, floats = _test_inputs(x_all[start : start + batch_size])
        ref = gm.model.eval()(model_layout(floats)).double()
        got = engine(model_layout(codes)).double() * engine.output_scale
        mismatches += int((ref != got).any(1).sum())
        labels = y_test[start : start + batch_size]
        n_test = min(len(labels), len(got))
        correct += int((got[:n_test].argmax(1) == labels[:n_test]).sum())
        tested += n_test
    return {"accuracy": correct / max(tested, 1), "bit_exact": mismatches == 0,
            "mismatches": mismatches, "samples": len(x_all)}


def time_sweep(gm: GlobalModel, test: TensorDataset, steps: Sequence[int],
               batch_size: int = 500) -> tuple[list[dict[str, Any]], list[str]]:
    """Accuracy of the SNN at each T (same weights). Event-frame models run at the data's T, a
    converted SNN at the T it was calibrated for."""
    x, _ = dataset_tensors(test)
    rows, notes = [], []
    converted = gm.kind == "converted-snn"
    native = int(gm.meta["time_steps"] if converted else gm.spec["time_steps"])
    for t in steps:
        if x.dim() == 5 and t != x.shape[1]:
            notes.append(f"T={t} skipped: event frames come with T={x.shape[1]}")
            continue
        if converted and t != native:
            notes.append(f"T={t} skipped: this SNN was calibrated for T={native}; evaluate its "
                         "QC-ANN checkpoint for a conversion sweep")
            continue
        if converted:
            _, accuracy = evaluate_model(gm.model, test, batch_size)
            rows.append({"time_steps": t, "ann_accuracy": gm.meta.get("ann_accuracy"),
                         "snn_accuracy": accuracy})
            continue
        model = gm.model if t == native else gm.rebuild(time_steps=t)
        _, accuracy = evaluate_model(model, test, batch_size)
        rows.append({"time_steps": t, "ann_accuracy": None, "snn_accuracy": accuracy})
    return rows, notes


class AttackView(nn.Module):
    """A differentiable stand-in for the deployed model, for computing attack gradients.

    A quantized model's eval path is integer arithmetic without gradients; the view runs its
    fake-quant path with BatchNorm on running statistics instead (same weights and neurons, so
    the attack's estimator swap reaches the real neurons). `train()` / `eval()` on the view change
    nothing: the attack code cannot switch the victim into another behaviour."""

    def __init__(self, model: nn.Module, quantized: bool) -> None:
        super().__init__()
        self.victim = model
        self.quantized = quantized

    def train(self, mode: bool = True) -> AttackView:  # noqa: ARG002 - deliberately inert
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        victim = self.victim
        if not self.quantized:
            victim.eval()
            return victim(x)
        victim.train()
        for module in victim.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        try:
            return victim(x)
        finally:
            victim.eval()


def run_attacks(gm: GlobalModel, test: TensorDataset, options: EvalOptions,
                on_step: Callable[[str], None] | None = None, dataset: str | None = None,
                ) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any] | None]:
    """The attack table and the robustness summary on the first `options.samples` test inputs
    (those the deployed model classifies correctly are attacked; success rate over those,
    robust accuracy over all of them, the worst case per input over every attack,
    `shared.attack.robustness`). Attacks that do not apply are listed with the reason instead.
    `dataset` names the budgets' dataset (default: the checkpoint's)."""
    if not options.attacks:
        return [], [], None
    from shared import attack

    x, y = dataset_tensors(test)
    x, y = x[: options.samples], y[: options.samples]
    events = x.dim() == 5
    xc, yc = attack.correctly_classified(gm.model, x, y, options.batch_size)
    view = AttackView(gm.model, gm.quantized)
    budgets = _budgets(dataset or gm.meta.get("dataset") or gm.config.get("dataset"), events,
                       options)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    sparse: dict[str, tuple[list[int], list[bool]]] = {}
    dense: list[str] = []
    for name in options.attacks:
        if name in ("sda", "topk"):
            if not events:
                skipped.append({"name": name, "reason": "needs binary event frames "
                                "(an event dataset such as dvs-digits)"})
                continue
            if on_step:
                on_step(name)
            summary, l0s, judged = _sparse_attack(gm, view, name, xc, yc, options.seed)
            row = summary.as_row(attempted=len(x))
            entries = x[0].numel()
            row["budget_success"] = {budgets.label(b): sum(
                f and v <= b * entries for v, f in zip(l0s, judged, strict=True)) / max(len(l0s), 1)
                for b in budgets.values}
            rows.append(row)
            sparse[name] = (l0s, judged)
            continue
        if events:
            skipped.append({"name": name, "reason": "an L-inf attack does not apply to binary "
                            "event frames; use sda"})
            continue
        dense.append(name)
    if events:
        robust = attack.sparse_robustness(sparse, len(x), x[0].numel(), budgets) if sparse \
            else None
    elif dense:
        plan = attack.LinfPlan(budgets, tuple(dense), steps=options.steps,
                               restarts=options.restarts, queries=options.queries,
                               checks=options.checks)
        twin = gm.rebuild(weight_bits=32).eval() if gm.quantized and options.checks else None
        robust = attack.linf_robustness(view, gm.model, xc, yc, len(x), plan, twin=twin,
                                        seed=options.seed, batch_size=options.batch_size,
                                        on_step=on_step)
        rows += robust.rows()
    else:
        robust = None
    return rows, skipped, None if robust is None else robust.summary()


def _budgets(dataset: str | None, events: bool, options: EvalOptions) -> Budgets:
    """The dataset's budgets with the options' curve and headline."""
    from shared.attack import default_budgets, with_budgets

    if dataset:
        budgets = default_budgets(dataset)
    else:  # a checkpoint that names no dataset: the MNIST-like or event defaults
        budgets = default_budgets("dvs-digits" if events else "mnist-subset")
    if budgets.threat == "l0":
        return with_budgets(budgets, options.l0_budgets, options.budget)
    return with_budgets(budgets, options.eps, options.budget)


def _sparse_attack(gm: GlobalModel, view: AttackView, name: str, xc: torch.Tensor,
                   yc: torch.Tensor, seed: int) -> tuple[AttackSummary, list[int], list[bool]]:
    """SDA (or its top-k baseline) one sample at a time on the view, judged on the deployed
    model; the summary, and per input the L0 and whether the deployed model was fooled."""
    from shared import attack

    fn = attack.sda if name == "sda" else attack.topk_baseline
    results, judged = [], []
    torch.manual_seed(seed)
    for i in range(len(yc)):
        sample = xc[i : i + 1].transpose(0, 1).contiguous()  # [T, 1, C, H, W]
        result = fn(view, sample, yc[i : i + 1])
        results.append(result)
        judged += attack.fooled(gm.model, result.x_adv.transpose(0, 1), yc[i : i + 1])
    summary = attack.summarize_sparse(name, results, judged=judged)
    return summary, [r.l0 for r in results], judged


def chip_figures(gm: GlobalModel, test: TensorDataset, preset: str, batch: int) -> dict[str, Any]:
    """Training-step and inference (the step's FP phase) figures on a chip preset, from one
    profiled step on the first `batch` test samples. Estimates of a modelled chip."""
    from shared.neurocore import ChipConfig, NeuroCore

    x, y = dataset_tensors(test)
    x, y = model_layout(x[:batch]), y[:batch]
    chip = NeuroCore(ChipConfig.preset(preset))
    report = chip.profile(gm.model, x, y)
    by_phase: dict[str, dict[str, float]] = {}
    by_layer: dict[str, dict[str, float]] = {}
    for row in report.rows:
        phase = by_phase.setdefault(row["phase"], {"energy_j": 0.0, "cycles": 0, "dram_bytes": 0})
        for key in phase:
            phase[key] += row[key]
        layer = by_layer.setdefault(row["layer"], {})
        layer[row["phase"]] = layer.get(row["phase"], 0.0) + row["energy_j"]
    fp = by_phase.get("fp", {"energy_j": 0.0, "cycles": 0, "dram_bytes": 0})
    n = len(y)
    return {
        "chip": preset, "batch": n,
        "energy_j": report.energy_j, "cycles": report.cycles, "dram_bytes": report.dram_bytes,
        "gpu_dram_bytes": report.gpu_dram_bytes,
        "dram_reduction": getattr(report, "dram_reduction", None),
        "inference_energy_j": fp["energy_j"], "inference_cycles": int(fp["cycles"]),
        "inference_dram_bytes": int(fp["dram_bytes"]),
        "inference_energy_per_sample_j": fp["energy_j"] / n,
        "train_energy_per_sample_j": report.energy_j / n,
        "by_phase": by_phase, "by_layer": by_layer,
        "note": "estimates of a modelled chip; op counts exact; inference = the step's FP phase",
    }


# ---------------------------------------------------------------------------------------------
# the pipeline


def evaluate_checkpoint(
    path: str | Path,
    options: EvalOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything `spikefed-evaluate` reports, as the JSON-ready dict of the spec (`options`:
    `EvalOptions()` when None)."""
    from shared.data import load_dataset

    options = options or EvalOptions()

    def stage(text: str) -> None:
        if on_stage:
            on_stage(text)

    started = time.perf_counter()
    stage("loading the checkpoint")
    gm = load_global_model(path)
    dataset = options.dataset or gm.meta.get("dataset") or gm.config.get("dataset")
    if not dataset:
        raise CheckpointError(f"checkpoint {gm.path} names no dataset; pass --dataset")
    data_dir = options.data_dir or gm.config.get("data-dir") or None
    framing = gm.framing()  # event recordings are framed as the run framed them
    test = load_dataset(dataset, "test", data_dir=data_dir, framing=framing)
    train = load_dataset(dataset, "train", data_dir=data_dir, framing=framing)
    torch.manual_seed(options.seed)

    stage("accuracy")
    loss, accuracy = evaluate_model(gm.model, test, options.batch_size)
    result: dict[str, Any] = {
        "checkpoint": str(gm.path), "round": gm.meta.get("round"), "kind": gm.kind,
        "model": gm.spec, "dataset": dataset, "test_samples": len(test),
        "accuracy": accuracy, "loss": loss,
    }
    stage("integer engine")
    result["integer"] = integer_check(gm, test, train, options.exact_samples, options.batch_size)
    if gm.kind == "qann":
        stage("dual-phase conversion")
        result["conversion"], gm = conversion_sweep(gm, test, train, options, stage)
        result["conversion_source"] = "dual-phase"
        notes = [f"attacks and chip figures: the SNN converted at T={gm.meta['time_steps']}"]
    else:
        stage("accuracy over T")
        result["conversion"], notes = time_sweep(gm, test, options.time_steps, options.batch_size)
        result["conversion_source"] = "snn-time-sweep"
    result["notes"] = notes
    result["attacks"], result["skipped_attacks"], result["robustness"] = run_attacks(
        gm, test, options, on_step=lambda s: stage(f"attack {s}"), dataset=dataset)
    stage("chip model")
    result["neurocore"] = chip_figures(gm, test, options.chip, options.chip_batch)
    result["options"] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in options.__dict__.items()}
    result["duration_s"] = time.perf_counter() - started
    return result


def conversion_sweep(
    gm: GlobalModel, test: TensorDataset, train: TensorDataset, options: EvalOptions,
    stage: Callable[[str], None],
) -> tuple[list[dict[str, Any]], GlobalModel]:
    """Dual-phase conversion of a QC-ANN checkpoint at each T, calibrated on train images (never
    test). Returns the rows and the SNN converted at the checkpoint's T (else the last T asked
    for), as the model the attacks and the chip figures use."""
    from shared.convert import dual_phase_convert

    _, ann_accuracy = evaluate_model(gm.model, test, options.batch_size)
    rows, target = [], None
    for t in options.time_steps:
        stage(f"dual-phase conversion at T={t}")
        snn, _ = dual_phase_convert(gm.model, train, t, seed=options.seed, stages=False)
        _, snn_accuracy = evaluate_model(snn, test, options.batch_size)
        rows.append({"time_steps": t, "ann_accuracy": ann_accuracy, "snn_accuracy": snn_accuracy})
        if target is None or t == int(gm.spec["time_steps"]):
            target = (t, snn)
    t, snn = target  # type: ignore[misc]
    meta = {**gm.meta, "kind": "converted-snn", "time_steps": t, "ann_accuracy": ann_accuracy}
    return rows, GlobalModel(gm.path, snn.eval(), {}, meta, gm.spec)
