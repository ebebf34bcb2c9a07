"""The neuromorphic training chip: exact op counts of real training steps, costed on a model of a
multi-core chip with Feedforward (FP), Back-propagation (BP) and Weight-gradient (WG) engines.

    from shared.neurocore import ChipConfig, NeuroCore
    report = NeuroCore(ChipConfig(cores=4, precision="fp16")).profile(model, x, y)
    report.rows            # {layer, phase, time_step, ops, neuron_ops, cycles, sram_bytes,
                           #  dram_bytes, energy_j, ...} per layer x phase x time step
    report.energy_j, report.dram_bytes, report.cycles, report.gpu_dram_bytes

Modules: `config` (ChipConfig, energy constants with sources, presets), `counts` (the hooks and
the exact counts), `cost` (cycles, bytes, energy; the A100 baseline), `calibrate` (the dense
reference workload), `chip` (NeuroCore, Accountant), `report`, `plots`; `python -m
shared.neurocore --help` writes reports and plots.
"""

from shared.neurocore.calibrate import calibration_scale, dense_workload_tflops_per_w
from shared.neurocore.chip import Accountant, NeuroCore
from shared.neurocore.config import PRESETS, ChipConfig, ChipConfigError
from shared.neurocore.cost import StepCost, cost_step
from shared.neurocore.counts import StepCounts, Tracer
from shared.neurocore.report import Report

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
]
