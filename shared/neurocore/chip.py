"""`NeuroCore`: profile one training step on the chip, or account every step of a training loop.

    chip = NeuroCore(ChipConfig.preset("paper-28nm-fp16"))
    report = chip.profile(model, x, y)            # forward + backward, the model left unchanged
    report.energy_j, report.cycles, report.dram_bytes, report.gpu_dram_bytes

    with chip.accountant(model) as acc:             # a real training loop, no extra passes
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            acc.step()
    acc.total.energy_j, acc.total.cycles, acc.total.dram_bytes, acc.total.spike_density

Building either resolves the chip's core-energy factor (`calibrate.resolve_energy_scale`: the
config's own `core_energy_scale`, or the calibrated one, computed once per configuration).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.neurocore.calibrate import dense_workload, resolve_energy_scale
from shared.neurocore.config import ChipConfig
from shared.neurocore.cost import (
    SavedTensorMeter,
    StepCost,
    StepPlan,
    cost_step,
    gpu_baseline,
    structure_key,
)
from shared.neurocore.counts import StepCounts, Tracer
from shared.neurocore.report import Report

CORE_SWEEP = (1, 2, 4, 8, 16, 20)


class Accountant:
    """Counts and costs every training step of `model` while attached (a context manager).

    Call `step()` after each backward; `total` holds the sum of the steps so far. Steps of the
    same shape share one `StepPlan`, so a step costs only its count-dependent part. With
    `train_precision` (the arithmetic the steps ran: float, fp16, int8) the chip is costed at that
    precision (`ChipConfig.for_training`; `config` then says what it replaced)."""

    def __init__(self, config: ChipConfig, model: nn.Module, time_steps: int | None = None,
                 train_precision: str | None = None):
        if train_precision is not None:
            config = config.for_training(train_precision)
        self.config = config
        self.energy_scale = resolve_energy_scale(config)
        self.tracer = Tracer(model, time_steps)
        self.total = StepCost()
        self._plans: dict[tuple, StepPlan] = {}

    def __enter__(self) -> Accountant:
        self.tracer.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracer.detach()

    def step(self) -> StepCost:
        counts = self.tracer.end_step()
        key = structure_key(counts)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = StepPlan(counts, self.config,
                                               energy_scale=self.energy_scale)
        cost = plan.cost(counts)
        self.total.add(cost)
        return cost


class NeuroCore:
    """The chip model: `ChipConfig` plus the tracer and the cost model. `energy_scale` is the
    factor applied to core energy (the calibrated one when `config.core_energy_scale` is None)."""

    def __init__(self, config: ChipConfig | None = None) -> None:
        self.config = config if config is not None else ChipConfig()
        self.energy_scale = resolve_energy_scale(self.config)

    def accountant(self, model: nn.Module, time_steps: int | None = None) -> Accountant:
        return Accountant(self.config, model, time_steps)

    def cost(self, counts: StepCounts, *, rows: bool = True) -> StepCost:
        return cost_step(counts, self.config, energy_scale=self.energy_scale, rows=rows)

    def trace(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        time_steps: int | None = None,
    ) -> tuple[StepCounts, dict[str, Any]]:
        """Run one training step's forward + backward on (x, y) and return its counts and the
        A100 baseline. The model is left as it was: parameters, buffers (BatchNorm running
        statistics), `.grad` and train/eval mode; no optimizer step is taken."""
        loss_fn = loss_fn or F.cross_entropy
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        was_training = model.training
        model.train()
        meter = SavedTensorMeter(model)
        try:
            with Tracer(model, time_steps) as tracer:
                with meter:
                    loss = loss_fn(model(x), y)
                if params and loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
                counts = tracer.end_step()
        finally:
            model.train(was_training)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
        return counts, gpu_baseline(meter, model, x, self.config.optimizer)

    def profile(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        time_steps: int | None = None,
    ) -> Report:
        """Forward + backward of one training step of `model` on the batch (x, y) (x as the model
        takes it), costed on this chip. See `trace` for what is left unchanged."""
        counts, gpu = self.trace(model, x, y, loss_fn=loss_fn, time_steps=time_steps)
        return self.report(counts, gpu, model_name=type(model).__name__)

    def report(
        self, counts: StepCounts, gpu: dict[str, Any] | None = None, *, model_name: str = ""
    ) -> Report:
        return Report.build(counts, self.cost(counts), self.config, gpu, model_name=model_name,
                            energy_scale=self.energy_scale)

    def write_report(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        out_dir: str | Path,
        *,
        core_sweep: Iterable[int] = CORE_SWEEP,
        model_name: str = "",
        extra: dict[str, Any] | None = None,
        plots: bool = True,
    ) -> Report:
        """Profile one training step and write `out_dir`: report.json (with the core sweep and
        `extra`), rows.csv, core_scaling.csv and the plots (`shared.neurocore.plots`)."""
        counts, gpu = self.trace(model, x, y)
        report = self.report(counts, gpu, model_name=model_name or type(model).__name__)
        sweep = self.sweep_cores(counts, core_sweep)
        out = Path(out_dir)
        report.write(out, extra={"core_sweep": sweep, **(extra or {})})
        with (out / "core_scaling.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(sweep[0]) if sweep else ["cores"])
            writer.writeheader()
            writer.writerows(sweep)
        if plots:
            from shared.neurocore.plots import write_plots

            write_plots(report, out, sweep)
        return report

    def sweep_cores(self, counts: StepCounts, cores: Iterable[int]) -> list[dict[str, Any]]:
        """The step re-costed on 1..n-core versions of this chip (same counts)."""
        out = []
        for n in cores:
            cost = NeuroCore(self.config.replace(cores=n)).cost(counts, rows=False)
            out.append({
                "cores": n,
                "cycles": cost.cycles,
                "compute_cycles": cost.compute_cycles,
                "dram_cycles": cost.dram_cycles,
                "energy_j": cost.energy_j,
                "dram_bytes": cost.dram_bytes,
                "imbalance": cost.imbalance,
            })
        base = out[0]["cycles"] if out else 0
        for entry in out:
            entry["speedup"] = base / entry["cycles"] if entry["cycles"] else 0.0
        return out


def dense_workload_tflops_per_w(config: ChipConfig, seed: int = 0) -> float:
    """TFLOPS/W of `config` (zero skipping off) on `calibrate.dense_workload`, a dense CNN training
    step traced from PyTorch: the check that calibration carries over to a real workload."""
    model, x, y = dense_workload(seed)
    report = NeuroCore(config.replace(sparsity_skip="none")).profile(model, x, y, time_steps=1)
    return report.tflops_per_w
