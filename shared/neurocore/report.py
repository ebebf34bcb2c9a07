"""`Report`: one training step on the chip, per layer x phase x time step, as JSON and CSV.

All figures are estimates of a modelled chip, not measurements of hardware; the operation counts
are exact.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.neurocore.config import ChipConfig
from shared.neurocore.cost import StepCost
from shared.neurocore.counts import StepCounts

ROW_FIELDS = (
    "layer", "phase", "time_step", "kind", "ops", "dense_ops", "executed_ops", "neuron_ops",
    "flops", "cycles", "sram_bytes", "dram_read_bytes", "dram_write_bytes", "dram_bytes",
    "energy_j", "density",
)


@dataclass
class Report:
    """Rows are dicts with `ROW_FIELDS` (`ops`: the exact sparse count of the phase; `executed_ops`:
    what the engines ran under the sparsity-skip mode; `neuron_ops`: vector-unit element ops;
    `density`: nonzero fraction of the input (FP) or error (BP) a row saw, spike rate for neurons).
    """

    rows: list[dict[str, Any]]
    energy_j: float
    dram_bytes: int
    cycles: int
    gpu_dram_bytes: int | None
    config: ChipConfig
    cost: StepCost
    meta: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None
    energy_scale: float | None = None  # the core-energy factor the chip applied

    @classmethod
    def build(
        cls,
        counts: StepCounts,
        cost: StepCost,
        config: ChipConfig,
        gpu: dict[str, Any] | None = None,
        *,
        model_name: str = "",
        energy_scale: float | None = None,
    ) -> Report:
        once = sorted({r.layer for r in counts.synaptic.values() if r.once}
                      | {r.layer for r in counts.elements.values() if r.once})
        notes = [
            "Estimates of a modelled chip (cycles, bytes, joules); the op counts are exact.",
            "Direct-coded head layers (computed once on [B, ...] and broadcast over T) are "
            f"counted once, at time step 0: {', '.join(once) if once else 'none in this step'}.",
            "Residual additions outside modules are not counted; static power is not modelled.",
        ]
        notes.extend(config.precision_notes())
        if config.membrane == "mask":
            notes.append("membrane='mask' keeps 1 bit per neuron and step: exact for a rectangle "
                         "surrogate, an approximate gradient for the others.")
        meta = {
            "model": model_name,
            "batch_size": counts.batch_size,
            "time_steps": counts.time_steps,
            "input": "event frames [T, B, ...]" if counts.event_input else "direct coding",
            "counted_once": once,
            "precision": config.precision,
            "train_precision": config.train_precision,
            "replaced_precision": config.replaced_precision,
            "notes": notes,
        }
        return cls(
            rows=cost.rows or [],
            energy_j=cost.energy_j,
            dram_bytes=cost.dram_bytes,
            cycles=cost.cycles,
            gpu_dram_bytes=int(gpu["dram_bytes"]) if gpu else None,
            config=config,
            cost=cost,
            meta=meta,
            gpu=gpu,
            energy_scale=energy_scale,
        )

    @property
    def dram_reduction(self) -> float | None:
        """1 - chip DRAM bytes / A100 DRAM bytes for the same step."""
        if not self.gpu_dram_bytes:
            return None
        return 1.0 - self.dram_bytes / self.gpu_dram_bytes

    @property
    def seconds(self) -> float:
        return self.cycles / (self.config.clock_mhz * 1e6)

    @property
    def tflops_per_w(self) -> float:
        return self.cost.tflops_per_w

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": True,
            **self.meta,
            "energy_j": self.energy_j,
            "dram_bytes": self.dram_bytes,
            "cycles": self.cycles,
            "seconds": self.seconds,
            "gpu_dram_bytes": self.gpu_dram_bytes,
            "dram_reduction": self.dram_reduction,
            "tflops_per_w": self.tflops_per_w,
            "totals": self.cost.summary(),
            "gpu_baseline": self.gpu,
            "config": self.config.model_dump(),
            "core_energy_scale": self.energy_scale,
            "energy_constants": self.config.energy_constants(self.energy_scale),
            "rows": self.rows,
        }

    def write(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> list[Path]:
        """Write `report.json` (everything, plus `extra`) and `rows.csv` into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if extra:
            data.update(extra)
        json_path = out / "report.json"
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        csv_path = out / "rows.csv"
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k) for k in ROW_FIELDS})
        return [json_path, csv_path]
