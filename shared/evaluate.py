"""Evaluation of a global model: accuracy, integer-engine exactness, accuracy over T (or the
dual-phase conversion sweep), attacks, and chip energy; and the `spikefed-evaluate` command.

    spikefed-evaluate runs/quick/checkpoints/round-002.safetensors --json eval.json --report eval.md

`evaluate_model` is the plain loss/accuracy loop the server and clients use every round;
`evaluate_checkpoint` is the whole pipeline behind the command and the end of `spikefed-run`.
Every figure is measured on the test split, except the integer engine's exactness check, which
tops the test split up from the train split when the test split has fewer samples than asked for
(exactness needs inputs, not held-out labels). Attacks run through a differentiable view of the
model and are judged on the deployed model: the integer-in-float path for a quantized model.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import TensorDataset

from shared.checkpoint import CheckpointError
from shared.cli import UserError, user_errors
from shared.rebuild import GlobalModel, load_global_model
from shared.snn import model_layout
from shared.snn.inference import dataset_tensors, evaluate_model, predict

# ---------------------------------------------------------------------------------------------
# options and the checkpoint


class EvaluateError(UserError):
    """A bad `spikefed-evaluate` option or an unusable checkpoint: one line, exit code 2."""


DEFAULT_ATTACKS = ("pgd-pdsg", "fgsm-pdsg", "pgd-atan", "sda")


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate. `samples` is the number of test inputs each attack tries;
    `exact_samples` the number of inputs the integer engine is compared on."""

    dataset: str | None = None  # None: the checkpoint's dataset
    data_dir: str | None = None
    time_steps: tuple[int, ...] = (1, 2, 4, 8)
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[float, ...] = (8 / 255, 16 / 255)
    samples: int = 200
    exact_samples: int = 1000
    chip: str = "edge-int8"
    chip_batch: int = 32
    batch_size: int = 500
    seed: int = 0


# the light set `spikefed-run` ends with: a few seconds to a minute on two cores
LIGHT = EvalOptions(time_steps=(1, 2, 4), attacks=("pgd-pdsg", "pgd-atan"), eps=(8 / 255,),
                    samples=100)


def light_options(dataset: str, **changes: Any) -> EvalOptions:
    """`LIGHT` with the attacks that apply to `dataset`: PGD (PDSG next to atan) on images, SDA
    on event frames, so the run's closing table has no skipped rows."""
    from dataclasses import replace

    from shared.data import dataset_info

    events = dataset_info(dataset).time_steps is not None
    return replace(LIGHT, attacks=("sda",) if events else LIGHT.attacks, **changes)


def parse_time_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise EvaluateError(f"--time-steps {text!r}: give integers, e.g. 1,2,4,8") from None
    if not steps or min(steps) < 1:
        raise EvaluateError(f"--time-steps {text!r}: every T must be >= 1, e.g. 1,2,4,8")
    return tuple(dict.fromkeys(steps))


def parse_eps(text: str) -> tuple[float, ...]:
    """`8/255,0.1` -> (0.0313..., 0.1); eps is an L-inf radius on inputs in [0, 1]."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise EvaluateError(f"--eps {part!r} is not a number or fraction (8/255)") from None
        if not 0 <= value <= 1:
            raise EvaluateError(f"--eps {part!r} must lie in [0, 1] (inputs are in [0, 1])")
        values.append(value)
    if not values:
        raise EvaluateError("--eps needs at least one value, e.g. 8/255,16/255")
    return tuple(values)


def check_chip(preset: str) -> str:
    from shared.neurocore import PRESETS

    if preset not in PRESETS:
        raise EvaluateError(f"unknown chip preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset


def parse_attacks(text: str) -> tuple[str, ...]:
    from shared.attack import ESTIMATORS

    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    for name in names:
        kind, _, estimator = name.partition("-")
        if name in ("sda", "topk"):
            continue
        if kind not in ("pgd", "fgsm") or estimator not in ESTIMATORS:
            raise EvaluateError(
                f"unknown attack {name!r}: use sda, topk, or pgd-/fgsm- with an estimator of "
                f"{', '.join(ESTIMATORS)} (e.g. pgd-pdsg)"
            )
    return names


# ---------------------------------------------------------------------------------------------
# the stages


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
                on_step: Callable[[str], None] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The attack table on the first `options.samples` test inputs that the deployed model
    classifies correctly (success rate over those); attacks that do not apply are listed with
    the reason instead."""
    if not options.attacks:
        return [], []
    from shared import attack

    x, y = dataset_tensors(test)
    x, y = x[: options.samples], y[: options.samples]
    events = x.dim() == 5
    correct = predict(gm.model, x, options.batch_size) == y
    xc, yc = x[correct], y[correct]
    view = AttackView(gm.model, gm.quantized)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for name in options.attacks:
        if name in ("sda", "topk"):
            if not events:
                skipped.append({"name": name, "reason": "needs binary event frames "
                                "(an event dataset such as dvs-digits)"})
                continue
            if on_step:
                on_step(name)
            rows.append(_sparse_row(gm, view, name, xc, yc, len(x), options.seed))
            continue
        kind, _, estimator = name.partition("-")
        if events:
            skipped.append({"name": name, "reason": "an L-inf attack does not apply to binary "
                            "event frames; use sda"})
            continue
        for eps in options.eps:
            if on_step:
                on_step(f"{name} eps={eps:.4f}")
            torch.manual_seed(options.seed)
            fn = attack.pgd if kind == "pgd" else attack.fgsm
            x_adv = fn(view, xc, yc, eps, grad=estimator) if len(xc) else xc
            fooled = predict(gm.model, x_adv, options.batch_size) != yc
            rows.append({"name": name, "eps": eps, "success_rate": _rate(fooled),
                         "mean_l0": None, "median_l0": None, "samples": len(yc),
                         "attempted": len(x)})
    return rows, skipped


def _rate(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if len(flags) else 0.0


def _sparse_row(gm: GlobalModel, view: AttackView, name: str, xc: torch.Tensor,
                yc: torch.Tensor, attempted: int, seed: int) -> dict[str, Any]:
    """SDA (or its top-k baseline) one sample at a time, judged on the deployed model."""
    from shared import attack

    fn = attack.sda if name == "sda" else attack.topk_baseline
    successes, l0s, passes = [], [], 0
    torch.manual_seed(seed)
    for i in range(len(yc)):
        sample = xc[i : i + 1].transpose(0, 1).contiguous()  # [T, 1, C, H, W]
        result = fn(view, sample, yc[i : i + 1])
        fooled = bool(predict(gm.model, result.x_adv.transpose(0, 1))[0] != yc[i])
        successes.append(fooled)
        passes += result.forward_passes + result.backward_passes
        if fooled:
            l0s.append(int(result.l0))
    entries = xc[0].numel() if len(xc) else 0
    return {
        "name": name, "eps": None,
        "success_rate": sum(successes) / len(successes) if successes else 0.0,
        "mean_l0": statistics.fmean(l0s) if l0s else None,
        "median_l0": statistics.median(l0s) if l0s else None,
        "median_l0_percent": 100 * statistics.median(l0s) / entries if l0s else None,
        "samples": len(yc), "attempted": attempted,
        "passes_per_sample": passes / len(yc) if len(yc) else 0,
    }


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
    options: EvalOptions = EvalOptions(),
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Everything `spikefed-evaluate` reports, as the JSON-ready dict of the spec."""
    from shared.data import load_dataset

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
    test = load_dataset(dataset, "test", data_dir=data_dir)
    train = load_dataset(dataset, "train", data_dir=data_dir)
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
    result["attacks"], result["skipped_attacks"] = run_attacks(
        gm, test, options, on_step=lambda s: stage(f"attack {s}"))
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


# ---------------------------------------------------------------------------------------------
# output: tables, JSON, Markdown report with plots


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def result_tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables of an evaluation (shared by `spikefed-evaluate` and `spikefed-run`)."""
    from rich.table import Table

    head = Table(title=f"global model: {Path(result['checkpoint']).name} "
                 f"({result['kind']}, {result['model']['name']}, {result['dataset']})")
    head.add_column("figure")
    head.add_column("value", justify="right")
    integer = result["integer"]
    head.add_row("accuracy", _pct(result["accuracy"]))
    if integer["samples"]:
        head.add_row("integer engine accuracy", _pct(integer["accuracy"]))
        head.add_row("integer engine bit-exact",
                     f"{integer['bit_exact']} ({integer['mismatches']} of {integer['samples']} "
                     "samples differ)")
    else:
        head.add_row("integer engine", integer.get("note", "-"))
    chip = result["neurocore"]
    head.add_row(f"inference energy / sample ({chip['chip']})",
                 f"{chip['inference_energy_per_sample_j'] * 1e6:.3f} µJ")
    head.add_row("training-step energy / sample",
                 f"{chip['train_energy_per_sample_j'] * 1e6:.3f} µJ")
    head.add_row("training-step DRAM bytes", f"{chip['dram_bytes']:,}")
    sweep = Table(title="accuracy over time steps"
                  + (" (dual-phase conversion)" if result["conversion_source"] == "dual-phase"
                     else ""), caption="; ".join(result["notes"]) or None)
    sweep.add_column("T", justify="right")
    sweep.add_column("ANN", justify="right")
    sweep.add_column("SNN", justify="right")
    for row in result["conversion"]:
        sweep.add_row(str(row["time_steps"]), _pct(row["ann_accuracy"]), _pct(row["snn_accuracy"]))
    attacks = Table(title="attacks (success over correctly classified inputs)")
    for col in ("attack", "eps", "success", "mean L0", "median L0", "inputs"):
        attacks.add_column(col, justify="left" if col == "attack" else "right")
    for row in result["attacks"]:
        eps = "-" if row["eps"] is None else f"{row['eps'] * 255:.0f}/255"
        attacks.add_row(row["name"], eps, _pct(row["success_rate"]),
                        "-" if row["mean_l0"] is None else f"{row['mean_l0']:.1f}",
                        "-" if row["median_l0"] is None else f"{row['median_l0']:.1f}",
                        str(row["samples"]))
    for row in result["skipped_attacks"]:
        attacks.add_row(row["name"], "-", "skipped", "", "", row["reason"])
    return [head, sweep, attacks]


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """A Markdown report at `path` with its plots in `<path's dir>/plots/` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    plots = path.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)

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

    path.write_text(_markdown(result))
    return path


def _markdown(result: dict[str, Any]) -> str:
    integer, chip = result["integer"], result["neurocore"]
    lines = [
        f"# Evaluation of {Path(result['checkpoint']).name}",
        "",
        f"Model {result['model']['name']} ({result['kind']}, T={result['model']['time_steps']}, "
        f"weight bits {result['model'].get('weight_bits', 32)}) on {result['dataset']} "
        f"({result['test_samples']} test samples), round {result['round']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| accuracy | {_pct(result['accuracy'])} |",
        f"| loss | {result['loss']:.4f} |",
    ]
    if integer["samples"]:
        lines += [f"| integer engine accuracy | {_pct(integer['accuracy'])} |",
                  f"| integer engine bit-exact | {integer['bit_exact']} "
                  f"({integer['mismatches']} of {integer['samples']} samples differ) |"]
    else:
        lines.append(f"| integer engine | {integer.get('note', '-')} |")
    lines += [
        f"| inference energy per sample ({chip['chip']}) | "
        f"{chip['inference_energy_per_sample_j'] * 1e6:.3f} µJ |",
        f"| training-step energy per sample | {chip['train_energy_per_sample_j'] * 1e6:.3f} µJ |",
        f"| training-step DRAM bytes (batch {chip['batch']}) | {chip['dram_bytes']:,} |",
        "",
        "## Accuracy over time steps"
        + (" (dual-phase conversion)" if result["conversion_source"] == "dual-phase" else ""),
        "",
        "| T | ANN | SNN |",
        "|---|---|---|",
        *(f"| {r['time_steps']} | {_pct(r['ann_accuracy'])} | {_pct(r['snn_accuracy'])} |"
          for r in result["conversion"]),
        *(f"\n{note}" for note in result["notes"]),
        "",
        "![accuracy vs T](plots/accuracy_vs_time_steps.png)",
        "",
        "## Attacks",
        "",
        "Success rate over the inputs the deployed model classifies correctly; gradients from a "
        "differentiable view of the model, success judged on the deployed model.",
        "",
        "| attack | eps | success | mean L0 | median L0 | inputs |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["attacks"]:
        eps = "-" if r["eps"] is None else f"{r['eps'] * 255:.0f}/255"
        mean = "-" if r["mean_l0"] is None else f"{r['mean_l0']:.1f}"
        median = "-" if r["median_l0"] is None else f"{r['median_l0']:.1f}"
        lines.append(f"| {r['name']} | {eps} | {_pct(r['success_rate'])} | {mean} | {median} "
                     f"| {r['samples']} |")
    lines += [f"| {r['name']} | - | skipped: {r['reason']} | | | |"
              for r in result["skipped_attacks"]]
    lines += [
        "",
        "![attack success vs eps](plots/attack_success_vs_eps.png)",
        "",
        "## Energy on the chip model",
        "",
        f"One training step on {chip['batch']} test samples, chip preset `{chip['chip']}` "
        f"({chip['note']}).",
        "",
        "| phase | energy (µJ) | cycles | DRAM bytes |",
        "|---|---|---|---|",
        *(f"| {phase.upper()} | {v['energy_j'] * 1e6:.3f} | {int(v['cycles']):,} | "
          f"{int(v['dram_bytes']):,} |" for phase, v in chip["by_phase"].items()),
        "",
        "![energy breakdown](plots/energy_breakdown.png)",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command

cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-evaluate runs/quick\n\n"
    "  spikefed-evaluate runs/quick/checkpoints/round-002.safetensors --json eval.json "
    "--report eval/report.md\n\n"
    "  spikefed-evaluate model.safetensors --time-steps 1,2,4 --attacks pgd-pdsg,pgd-atan "
    "--eps 4/255,8/255 --samples 500"
)
@user_errors
def main(
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint (.safetensors with its .json) or a run directory (newest round).")],
    dataset: Annotated[str | None, typer.Option(
        help="Evaluate on this dataset [default: the checkpoint's].")] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="Directory of a local dataset (mnist, cifar10).")] = None,
    time_steps: Annotated[str, typer.Option(help="T values of the sweep.")] = "1,2,4,8",
    attacks: Annotated[str, typer.Option(
        help="pgd-/fgsm-<estimator> (pdsg or a surrogate), sda, topk.")] =
        ",".join(DEFAULT_ATTACKS),
    eps: Annotated[str, typer.Option(help="L-inf radii, e.g. 8/255,16/255.")] = "8/255,16/255",
    samples: Annotated[int, typer.Option(min=1, help="Test inputs per attack.")] = 200,
    exact_samples: Annotated[int, typer.Option(
        min=1, help="Inputs the integer engine is compared on.")] = 1000,
    chip: Annotated[str, typer.Option(help="Chip preset of the energy model.")] = "edge-int8",
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results.")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write a Markdown report (plots go to plots/ beside it).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the attacks' random starts.")] = 0,
) -> None:
    """Evaluate a global model: accuracy, integer-engine exactness, accuracy over T (or the
    dual-phase conversion of a QC-ANN), attacks with PDSG and fixed surrogates, chip energy."""
    options = EvalOptions(
        dataset=dataset, data_dir=data_dir, time_steps=parse_time_steps(time_steps),
        attacks=parse_attacks(attacks), eps=parse_eps(eps), samples=samples,
        exact_samples=exact_samples, chip=check_chip(chip), seed=seed,
    )
    console = Console(highlight=False)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate_checkpoint(
            checkpoint, options, on_stage=lambda s: progress.update(task, description=s))
    for table in result_tables(result):
        console.print(table)
    if json_file:
        console.print(f"results: {write_json(result, json_file)}")
    if report:
        console.print(f"report: {write_report(result, report)}")


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
