"""The neuromorphic training chip: exact op counts of real training steps, costed on a model of a
multi-core chip with Feedforward (FP), Back-propagation (BP) and Weight-gradient (WG) engines.

    from shared.neurocore import ChipConfig, NeuroCore
    report = NeuroCore(ChipConfig(cores=4, precision="fp16")).profile(model, x, y)
    report.rows            # {layer, phase, time_step, ops, neuron_ops, cycles, sram_bytes,
                           #  dram_bytes, energy_j, ...} per layer x phase x time step
    report.energy_j, report.dram_bytes, report.cycles, report.gpu_dram_bytes

Modules, each importing only those before it: `config` (ChipConfig, a plain value; energy
constants with sources, presets), `counts` (the hooks and the exact counts), `cost` (cycles, bytes,
energy; the A100 baseline), `calibrate` (the dense reference workloads and the core-energy factor),
`report`, `plots`, `chip` (NeuroCore and Accountant, which resolve the calibration); `python -m
shared.neurocore --help` writes reports and plots.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shared.neurocore.config import PRESETS, ChipConfig, ChipConfigError

if TYPE_CHECKING:
    from shared.neurocore.calibrate import calibration_scale, resolve_energy_scale
    from shared.neurocore.chip import Accountant, NeuroCore, dense_workload_tflops_per_w
    from shared.neurocore.cost import StepCost, cost_step
    from shared.neurocore.counts import StepCounts, Tracer
    from shared.neurocore.report import Report

# Imported on first use, so that `shared.neurocore.config` (and PRESETS) stay free of torch and of
# the chip model.
_LAZY = {
    "Accountant": "chip",
    "NeuroCore": "chip",
    "dense_workload_tflops_per_w": "chip",
    "calibration_scale": "calibrate",
    "resolve_energy_scale": "calibrate",
    "StepCost": "cost",
    "cost_step": "cost",
    "StepCounts": "counts",
    "Tracer": "counts",
    "Report": "report",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "PRESETS",
    "Accountant",
    "ChipConfig",
    "ChipConfigError",
    "NeuroCore",
    "Report",
    "StepCost",
    "StepCounts",
    "Tracer",
    "calibration_scale",
    "cost_step",
    "dense_workload_tflops_per_w",
    "resolve_energy_scale",
]
