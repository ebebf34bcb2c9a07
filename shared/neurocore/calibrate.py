"""Calibration: the dense fp16 reference workload and the core-energy factor fitted to it.

TFLOPS/W here is delivered FLOPs (MAC = 2, accumulate = 1, vector op = 1) per joule of core
energy (compute, vector unit, SRAM; DRAM is off chip and excluded), the way chip papers quote
peak efficiency. The reference is a dense workload: every synaptic op a MAC, nothing skipped.
`resolve_energy_scale` is what the chip model (`NeuroCore`, `Accountant`) applies: the config's
own `core_energy_scale`, or the calibrated factor (cached per configuration). `dense_workload` is a
different dense workload, traced from a real PyTorch training step, on which
`shared.neurocore.chip.dense_workload_tflops_per_w` checks the calibration.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from shared.neurocore.config import ChipConfig
from shared.neurocore.cost import cost_step
from shared.neurocore.counts import ACTIVATION, StepCounts, SynapticCounts

REFERENCE = (
    "dense fp16 training step (FP, BP, WG, SGD update) of one 3x3 conv layer, 64 -> 64 channels, "
    "32x32 maps, padding 1, batch 16, one time step, analog inputs, no zero skipping"
)


def reference_counts() -> StepCounts:
    """The counts of the `REFERENCE` workload (built directly: every element nonzero)."""
    batch, channels, side, k = 16, 64, 32, 3
    taps = (k * side - 2) ** 2  # in-bounds taps over all output positions, padding 1
    dense = channels * channels * taps
    elems = channels * side * side
    full = torch.full((batch,), float(dense), dtype=torch.float64)
    record = SynapticCounts(
        layer="reference",
        kind="conv",
        time_step=0,
        once=False,
        source=ACTIVATION,
        binary=False,
        in_elems=elems,
        out_elems=elems,
        weights=channels * channels * k * k,
        dense=dense,
        fp=full.clone(),
        in_nonzero=float(batch * elems),
        bp=full.clone(),
        wg=full.clone(),
        bp_needed=True,
        wg_needed=True,
        err_elems=elems,
        err_nonzero=float(batch * elems),
    )
    return StepCounts(
        batch_size=batch,
        time_steps=1,
        event_input=False,
        synaptic={("reference", 0): record},
        params={"reference": record.weights},
        layer_order=["reference"],
    )


@functools.lru_cache(maxsize=64)
def _scale(twin_items: tuple) -> float:
    twin = ChipConfig(**dict(twin_items))
    cost = cost_step(reference_counts(), twin, energy_scale=1.0, rows=False)
    return cost.flops / (twin.target_tflops_per_w * 1e12 * cost.core_energy_j)


def calibration_scale(config: ChipConfig) -> float:
    """The core-energy factor at which `config`'s fp16 twin runs `REFERENCE` at exactly
    `config.target_tflops_per_w` (computed once per distinct twin)."""
    data = config.model_dump()
    data.update(precision="fp16", sparsity_skip="none", core_energy_scale=1.0)
    return _scale(tuple(sorted(data.items())))


def resolve_energy_scale(config: ChipConfig) -> float:
    """The factor the chip model applies to core energy: `config.core_energy_scale` when set,
    otherwise `calibration_scale(config)`."""
    if config.core_energy_scale is not None:
        return config.core_energy_scale
    return calibration_scale(config)


def dense_workload(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A dense CNN training step: conv3x3(3->32), conv3x3 stride 2 (32->64), conv3x3(64->64),
    global average pool, linear(64 -> 10); batch 8, 32x32 inputs in [0.1, 1.1), so that every
    input, activation and error is nonzero (no ReLU). Returns (model, x [8, 3, 32, 32], y [8])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
    x = torch.rand(8, 3, 32, 32, generator=gen) + 0.1
    y = torch.arange(8) % 10
    return model, x, y
