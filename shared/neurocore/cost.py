"""The cost model: from a step's exact counts to cycles, bytes and joules (labelled estimates).

Executed work. The engines skip zeros according to `sparsity_skip`:

    phase   none    input           output          dual
    FP      dense   FP (nz inputs)  dense           FP
    BP      dense   dense           BP (nz errors)  BP
    WG      dense   FP              BP              WG (co-nonzero pairs)

(the WG pairs with a nonzero input are exactly the FP triples, those with a nonzero error the BP
ones). An op on a binary input (a spike) is an accumulate (AC: one add, 1 FLOP), otherwise a MAC
(mul + add, 2 FLOPs). With `membrane="recompute"` the forward is run twice (FP work doubles).

Vector unit, ops per element: neuron forward 3 (charge, fire, reset; +1 leak shift), neuron
backward 3 (surrogate, product, carry; +1 leak); BatchNorm forward 4 with batch statistics
(2 without), backward 4, parameter gradient 3; pooling 1 per input element each way; optimizer
per parameter: SGD with momentum 4, Adam 12.

Dataflow. The cores split the batch (sample b goes to core b mod k) and each core trains its
samples one at a time, accumulating weight gradients: FP of one sample overlaps BP and WG of the
previous one, so the FP, BP and WG engines form a pipeline. (BatchNorm's batch statistics are
taken as available; a chip would fold BN or use running statistics.)

Cycles. For every row (layer, phase, time step) the scheduler uses the k <= cores that finishes
first, so the row takes ceil(max-core load / (lanes x utilization)) engine cycles (vector work:
/ neuron lanes); the load imbalance comes from the per-core nonzeros of the real samples. The
step's compute time is the largest engine total (pipelined engines); the step takes
max(compute, DRAM bytes / DRAM bytes per cycle).

Bytes. SRAM: the tensors each row reads and writes (spikes 1 bit, analog inputs at input
precision, currents / potentials / errors / gradient accumulators at state precision, the weights
once per sample and row). DRAM, per step: the input batch; every trainable parameter read once,
updated weights written back (read again by the next step); a layer's weights and gradient
accumulators stay in SRAM when they fit in `weight_sram_fraction` of one core's SRAM (layers in
forward order), otherwise the weights are re-read at every time step of FP and BP and the gradient
partials go through DRAM between time steps; optimizer state read and written. The rest of a
core's SRAM holds one sample's state: first the live membrane potentials (FP) / error carries (BP)
of every neuron layer (a layer that does not fit round-trips them through DRAM at every time
step), then the state saved for the backward pass (spikes, membrane per `membrane`, analog layer
inputs), newest first since it is consumed first; what does not fit is written in FP and read
back in BP. BatchNorm's backward recomputes its normalised input from the stored membrane and
spikes (x[t] = h[t] - decay v[t-1]), so it adds no storage. So the DRAM traffic per sample does
not depend on the batch size or the core count.

Energy = core_energy_scale x (ops x op energy + vector ops x add energy + SRAM bytes x SRAM
energy) + DRAM bytes x DRAM energy; static power is not modelled.

GPU baseline: an A100 running the same eager PyTorch step moves, through its 1555 GB/s HBM, the
input, every tensor autograd saves for BPTT (written in the forward pass, read in the backward;
measured on the real step), and the parameters: read in forward and backward, gradients written
and read, weights and optimizer state read and written by the optimizer. L2 reuse is ignored.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from shared.neurocore.config import A100_DRAM_GBPS, ChipConfig
from shared.neurocore.counts import ACTIVATION, DATA, StepCounts

PHASES = ("fp", "bp", "wg")
NEURON_OPS = 3  # per neuron and step, each way; +1 with a leak
NORM_FP_OPS = {True: 4, False: 2}  # with / without batch statistics
NORM_BP_OPS = 4
NORM_WG_OPS = 3
OPTIMIZER_OPS = {"sgd": 4, "adam": 12}
OPTIMIZER_STATES = {"sgd": 1, "adam": 2}
LEDGER = ("input", "weights", "gradients", "optimizer_state", "saved_state", "working_state")


Slot = tuple[tuple[str, int], str]  # (synaptic record key, "fp" | "bp" | "wg")


@dataclass
class _Row:
    """One (layer, phase, time step): everything that depends only on the step's shapes, plus
    slots naming the per-sample count tensors that vary from step to step."""

    layer: str
    phase: str
    time_step: int
    kind: str
    dense_ops: float = 0.0
    ops_slot: Slot | None = None  # the exact (sparse) count of the phase
    load_slot: Slot | None = None  # executed synaptic ops per sample ...
    load_scale: int = 1  # ... times this (FP recompute)
    uniform: float = 0.0  # ... or, without a slot, this many per sample (dense work)
    synaptic: bool = False
    binary: bool = False
    vector_per_sample: float = 0.0
    vector_global: float = 0.0  # split evenly over all cores (optimizer)
    sram_bytes: float = 0.0
    dram_read: float = 0.0
    dram_write: float = 0.0
    density: tuple[str, tuple[str, int]] | None = None  # ("in" | "err" | "spikes", record key)
    # filled in by the plan: the step-independent part of the row's cost
    cycles: int = 0
    executed: float = 0.0
    op_pj: float = 0.0
    flops_per_op: int = 2
    vector_ops: float = 0.0
    core_pj: dict[str, float] = field(default_factory=dict)
    dram_pj: float = 0.0
    flops: float = 0.0


@dataclass
class StepCost:
    """The cost of one step (or the sum of several, see `add`). Energies in joules."""

    energy_j: float = 0.0
    core_energy_j: float = 0.0
    dram_energy_j: float = 0.0
    cycles: int = 0
    compute_cycles: int = 0
    dram_cycles: int = 0
    engine_cycles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    executed_ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    dense_ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    neuron_ops: int = 0
    flops: int = 0
    sram_bytes: int = 0
    dram_read_bytes: int = 0
    dram_write_bytes: int = 0
    ledger: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {"written": 0, "read": 0} for k in LEDGER}
    )
    energy_by_phase: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    energy_by_part: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("compute", "vector", "sram", "dram"), 0.0)
    )
    spikes: float = 0.0
    neuron_steps: int = 0
    steps: int = 0
    imbalance: float = 1.0  # executed-op-weighted mean of max-core load / mean-core load
    resident_layers: list[str] = field(default_factory=list)
    spilled_state: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] | None = None

    @property
    def dram_bytes(self) -> int:
        return self.dram_read_bytes + self.dram_write_bytes

    @property
    def tflops_per_w(self) -> float:
        """Delivered FLOPs per joule of core (non-DRAM) energy, in TFLOPS/W."""
        return self.flops / self.core_energy_j / 1e12 if self.core_energy_j else 0.0

    @property
    def spike_density(self) -> float:
        return self.spikes / self.neuron_steps if self.neuron_steps else 0.0

    def copy(self) -> StepCost:
        new = copy.copy(self)
        for name in ("engine_cycles", "ops", "executed_ops", "dense_ops", "energy_by_phase",
                     "energy_by_part"):
            setattr(new, name, dict(getattr(self, name)))
        new.ledger = {k: dict(v) for k, v in self.ledger.items()}
        new.resident_layers = list(self.resident_layers)
        new.spilled_state = list(self.spilled_state)
        return new

    def add(self, other: StepCost) -> None:
        """Accumulate `other` (a later step) into this total; rows are not kept."""
        weight = sum(self.executed_ops.values())
        other_weight = sum(other.executed_ops.values())
        if weight + other_weight:
            self.imbalance = (
                self.imbalance * weight + other.imbalance * other_weight
            ) / (weight + other_weight)
        for name in (
            "energy_j", "core_energy_j", "dram_energy_j", "cycles", "compute_cycles",
            "dram_cycles", "neuron_ops", "flops", "sram_bytes", "dram_read_bytes",
            "dram_write_bytes", "spikes", "neuron_steps", "steps",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("engine_cycles", "ops", "executed_ops", "dense_ops", "energy_by_phase",
                     "energy_by_part"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        for key, entry in other.ledger.items():
            for way, value in entry.items():
                self.ledger[key][way] += value
        self.rows = None

    def summary(self) -> dict[str, Any]:
        out = {
            k: v for k, v in self.__dict__.items() if k not in ("rows",) and not k.startswith("_")
        }
        out.update(dram_bytes=self.dram_bytes, tflops_per_w=self.tflops_per_w,
                   spike_density=self.spike_density)
        return out


_DEALS: dict[tuple[int, int], Tensor] = {}


def _best_split(loads: Tensor, cores: int) -> tuple[Tensor, Tensor]:
    """Per row of `loads` ([R, B] work per sample): the smallest max-core load over k = 1..cores
    cores with samples dealt round robin (sample b to core b mod k), and that k (the smallest
    on ties). One matrix product against a 0/1 dealing table [B, k, core]; exact in float64."""
    rows, batch = loads.shape
    k_max = min(cores, batch)
    if batch * k_max * k_max > 2**22:  # a table too large to keep: one k at a time
        best = loads.sum(1)
        k_best = torch.ones(rows, dtype=torch.long)
        for k in range(2, k_max + 1):
            per_core = loads.new_zeros(rows, k).index_add_(1, torch.arange(batch) % k, loads)
            worst = per_core.amax(1)
            better = worst < best
            best = torch.where(better, worst, best)
            k_best[better] = k
        return best, k_best
    deal = _DEALS.get((batch, k_max))
    if deal is None:
        sample = torch.arange(batch)
        deal = torch.zeros(batch, k_max, k_max, dtype=torch.float64)
        for k in range(1, k_max + 1):
            deal[sample, k - 1, sample % k] = 1.0
        deal = _DEALS[(batch, k_max)] = deal.view(batch, k_max * k_max)
    worst = (loads @ deal).view(rows, k_max, k_max).amax(2)  # [R, k]: the busiest core
    best, index = worst.min(1)
    return best, index + 1


def structure_key(counts: StepCounts) -> tuple:
    """Everything about a step except its per-sample counts: steps with equal keys share a plan."""
    syn = tuple(
        (k, r.kind, r.once, r.source, r.binary, r.in_elems, r.out_elems, r.weights, r.dense,
         r.bp is not None, r.bp_needed, r.wg is not None, r.wg_needed, r.err_elems)
        for k, r in counts.synaptic.items()
    )
    elements = tuple(
        (k, r.kind, r.in_elems, r.out_elems, r.fp_calls, r.bp_calls, r.has_params, r.training,
         r.leak, r.in_spikes)
        for k, r in counts.elements.items()
    )
    return (counts.batch_size, counts.time_steps, counts.data_binary, syn, elements,
            tuple(counts.params.items()), tuple(counts.layer_order))


def cost_step(
    counts: StepCounts, cfg: ChipConfig, *, energy_scale: float | None = None, rows: bool = True
) -> StepCost:
    """Cost one step's counts on chip `cfg` with core-energy factor `energy_scale` (see
    `StepPlan`); `rows=True` also lists every row as a dict."""
    return StepPlan(counts, cfg, energy_scale=energy_scale).cost(counts, rows=rows)


class StepPlan:
    """The cost of a step's structure on chip `cfg`: rows, bytes, vector work and every dense
    (count-independent) synaptic row, evaluated once; `cost(counts)` adds the sparse synaptic
    work of a step with the same `structure_key`.

    `energy_scale` multiplies all core energy; it defaults to `cfg.core_energy_scale`. A config
    left to calibration has none: `NeuroCore` and `Accountant` resolve it
    (`shared.neurocore.calibrate.resolve_energy_scale`)."""

    def __init__(
        self, counts: StepCounts, cfg: ChipConfig, *, energy_scale: float | None = None
    ) -> None:
        if energy_scale is None:
            energy_scale = cfg.core_energy_scale
        if energy_scale is None:
            raise ValueError(
                "neurocore: this ChipConfig is left to calibration (core_energy_scale=None); cost "
                "it through NeuroCore(config), or pass "
                "energy_scale=shared.neurocore.calibrate.resolve_energy_scale(config)"
            )
        self.cfg = cfg
        self.scale = energy_scale
        self.key = structure_key(counts)
        self.batch = counts.batch_size
        self.ledger = {k: {"written": 0.0, "read": 0.0} for k in LEDGER}
        self._layout(counts)
        self._static()

    # -- layout: rows, SRAM and DRAM bytes -----------------------------------------------------
    def _layout(self, counts: StepCounts) -> None:
        """Lay the step out as rows with their SRAM bytes, vector work and DRAM traffic (the
        ledger), in the order of the module docstring's "Bytes" paragraph."""
        cfg = self.cfg
        widths = _Widths.of(counts, cfg)
        weights, resident = _resident_weights(counts, cfg)
        live_kept, kept, self.spilled_state = _state_in_sram(counts, cfg, widths)
        self.resident_layers = sorted(resident)
        layout = _Layout(self.ledger)
        first_fp: set[str] = set()  # layers whose parameters have been read
        _synaptic_rows(layout, counts, cfg, widths, resident, kept, first_fp)
        _element_rows(layout, counts, widths, live_kept, kept, first_fp)
        _gradient_partials(layout, weights, resident, widths.state_b)
        _optimizer_updates(layout, counts, cfg, widths)
        self.rows = layout.rows

    # -- the count-independent cost of every row ----------------------------------------------
    def _static(self) -> None:
        cfg, batch = self.cfg, self.batch
        self.lanes = {"fp": cfg.lanes_fp, "bp": cfg.lanes_bp, "wg": cfg.lanes_wg}
        self.k_max = min(cfg.cores, batch)
        samples_per_core = math.ceil(batch / self.k_max)
        scale = self.scale
        dram_pj_byte = cfg.dram_pj_per_bit * 8
        total = self.total = StepCost()
        self.imbalance = [0.0, 0.0]  # sum of max-core load x cores, sum of executed ops
        self.dynamic: list[_Row] = []
        self.counted = [row for row in self.rows if row.ops_slot is not None]
        for row in self.rows:
            row.op_pj = cfg.ac_pj if row.binary and row.phase in ("fp", "wg") else cfg.mac_pj
            row.flops_per_op = 1 if row.binary and row.phase in ("fp", "wg") else 2
            vec_ops = row.vector_per_sample * batch + row.vector_global
            if row.vector_per_sample:
                row.cycles += math.ceil(row.vector_per_sample * samples_per_core / cfg.neuron_lanes)
            if row.vector_global:
                row.cycles += math.ceil(row.vector_global / (cfg.neuron_lanes * cfg.cores))
            row.core_pj = {"vector": vec_ops * cfg.vector_pj * scale,
                           "sram": row.sram_bytes * cfg.sram_pj_per_byte * scale}
            row.dram_pj = (row.dram_read + row.dram_write) * dram_pj_byte
            row.flops = vec_ops
            row.vector_ops = vec_ops
            if row.synaptic and row.load_slot is None:  # dense work: known now
                worst = row.uniform * samples_per_core * row.load_scale
                row.executed = row.uniform * batch * row.load_scale
                row.cycles += math.ceil(worst / (self.lanes[row.phase] * cfg.utilization))
                row.core_pj["compute"] = row.executed * row.op_pj * scale
                row.flops += row.executed * row.flops_per_op
                if row.executed:
                    self.imbalance[0] += worst * self.k_max
                    self.imbalance[1] += row.executed
            elif row.synaptic:
                self.dynamic.append(row)
            _add_row(total, row, row.cycles, row.executed, row.flops, row.core_pj)
        total.ledger = {k: {w: round(v) for w, v in e.items()} for k, e in self.ledger.items()}
        total.dram_read_bytes = round(sum(e["read"] for e in self.ledger.values()))
        total.dram_write_bytes = round(sum(e["written"] for e in self.ledger.values()))
        total.dram_cycles = math.ceil(total.dram_bytes / cfg.dram_bytes_per_cycle)
        total.resident_layers = self.resident_layers
        total.spilled_state = self.spilled_state

    # -- one step --------------------------------------------------------------------------------
    def cost(self, counts: StepCounts, *, rows: bool = False) -> StepCost:
        """The cost of `counts` (a step with this plan's `structure_key`)."""
        cfg, scale = self.cfg, self.scale
        slots: dict[Slot, Tensor] = {}
        for key, r in counts.synaptic.items():
            for name in ("fp", "bp", "wg"):
                tensor = getattr(r, name)
                if tensor is not None:
                    slots[(key, name)] = tensor
        names = list(slots)
        split: dict[Slot, tuple[float, int, float]] = {}
        if names:
            loads = torch.stack([slots[n] for n in names])
            worst, k_best = _best_split(loads, cfg.cores)
            split = dict(zip(names, zip(worst.tolist(), k_best.tolist(), loads.sum(1).tolist(),
                                        strict=True), strict=True))
        cost = self.total.copy()
        cost.steps = 1
        cost.spikes, cost.neuron_steps = counts.spike_count, counts.neuron_steps
        imbalance = list(self.imbalance)
        dynamic: dict[int, tuple[int, float, float, float]] = {}
        for row in self.dynamic:
            worst, k, executed = split[row.load_slot]  # type: ignore[index]
            worst, executed = worst * row.load_scale, executed * row.load_scale
            cycles = math.ceil(worst / (self.lanes[row.phase] * cfg.utilization))
            compute_pj = executed * row.op_pj * scale
            flops = executed * row.flops_per_op
            _add_row(cost, row, cycles, executed, flops, {"compute": compute_pj})
            dynamic[id(row)] = (cycles, executed, compute_pj, flops)
            if executed:
                imbalance[0] += worst * k
                imbalance[1] += executed
        for row in self.counted:
            cost.ops[row.phase] += round(split[row.ops_slot][2])  # type: ignore[index]
        cost.compute_cycles = max(cost.engine_cycles.values())
        cost.cycles = max(cost.compute_cycles, cost.dram_cycles)
        cost.imbalance = imbalance[0] / imbalance[1] if imbalance[1] else 1.0
        if rows:
            cost.rows = [self._row_dict(row, counts, split, dynamic.get(id(row)))
                         for row in self.rows]
        return cost

    def _row_dict(self, row: _Row, counts: StepCounts, split: dict, dynamic: tuple | None
                  ) -> dict[str, Any]:
        cycles, executed, flops = row.cycles, row.executed, row.flops
        core_pj = sum(row.core_pj.values())
        if dynamic is not None:
            cycles, executed, compute_pj, extra_flops = dynamic
            cycles += row.cycles
            core_pj += compute_pj
            flops += extra_flops
        density = None
        if row.density is not None:
            what, key = row.density
            batch = self.batch
            if what == "spikes":
                e = counts.elements[key]
                n = e.in_elems * e.fp_calls * batch
                density = e.spikes / n if n else None
            else:
                r = counts.synaptic[key]
                nonzero, elems = (r.in_nonzero, r.in_elems) if what == "in" else (
                    r.err_nonzero, r.err_elems)
                density = nonzero / (elems * batch) if elems else None
        dram = row.dram_read + row.dram_write
        return {
            "layer": row.layer,
            "phase": row.phase,
            "time_step": row.time_step,
            "kind": row.kind,
            "ops": round(split[row.ops_slot][2]) if row.ops_slot is not None else 0,
            "dense_ops": round(row.dense_ops),
            "executed_ops": round(executed),
            "neuron_ops": round(row.vector_ops),
            "flops": round(flops),
            "cycles": cycles,
            "sram_bytes": round(row.sram_bytes),
            "dram_read_bytes": round(row.dram_read),
            "dram_write_bytes": round(row.dram_write),
            "dram_bytes": round(dram),
            "energy_j": (core_pj + row.dram_pj) * 1e-12,
            "density": density,
        }


# -- layout: the steps of `StepPlan._layout` ---------------------------------------------------
@dataclass(frozen=True)
class _Widths:
    """Storage widths of one step on one chip."""

    state_b: float  # bytes per potential, current, error or gradient accumulator
    weight_b: float  # bytes per weight
    data_bits: int  # bits per input element (1 for binary event frames)
    membrane_bits: int  # bits kept per neuron and step for the surrogate gradient
    recompute: int  # 2 when the backward pass re-runs the forward (FP work doubles), else 1

    @classmethod
    def of(cls, counts: StepCounts, cfg: ChipConfig) -> _Widths:
        spec = cfg.spec
        return cls(
            state_b=spec.state_bits / 8,
            weight_b=spec.weight_bits / 8,
            data_bits=1 if counts.data_binary else spec.input_bits,
            membrane_bits={"store": spec.state_bits, "mask": 1, "recompute": 0}[cfg.membrane],
            recompute=2 if cfg.membrane == "recompute" else 1,
        )


class _Layout:
    """The rows being laid out, grouped by (layer, phase), and the step's DRAM ledger (bytes)."""

    def __init__(self, ledger: dict[str, dict[str, float]]) -> None:
        self.ledger = ledger
        self.rows: list[_Row] = []
        self.by_key: dict[tuple[str, str], list[_Row]] = defaultdict(list)

    def new_row(self, layer: str, phase: str, t: int, kind: str) -> _Row:
        row = _Row(layer, phase, t, kind)
        self.rows.append(row)
        self.by_key[(layer, phase)].append(row)
        return row

    def move(self, row: _Row, category: str, way: str, nbytes: float) -> None:
        """Book `nbytes` of DRAM traffic ("read" or "written") under a `LEDGER` category."""
        if nbytes:
            self.ledger[category][way] += nbytes
            if way == "read":
                row.dram_read += nbytes
            else:
                row.dram_write += nbytes


def _set_load(row: _Row, slot: Slot | None, sparse: bool, dense: int, scale: int = 1) -> None:
    """Make `row` synaptic: its per-sample work is the counts in `slot` when the engine skips
    zeros (`sparse`), otherwise `dense` ops per sample; times `scale` (FP recompute)."""
    row.synaptic, row.load_scale = True, scale
    if sparse and slot is not None:
        row.load_slot = slot
    else:
        row.uniform = float(dense)


def _resident_weights(counts: StepCounts, cfg: ChipConfig) -> tuple[dict[str, int], set[str]]:
    """Weights and gradient accumulators resident in one core's weight SRAM, forward order.

    Returns the weight count of every synaptic layer and the layers whose weights plus gradient
    accumulators fit, in forward order, in `weight_sram_fraction` of `sram_kb` (bytes)."""
    spec = cfg.spec
    weight_cap = cfg.sram_kb * 1024 * cfg.weight_sram_fraction
    weights = {r.layer: r.weights for r in counts.synaptic.values()}
    resident: set[str] = set()
    used = 0.0
    for layer in counts.layer_order:
        if layer in weights:
            need = weights[layer] * (spec.weight_bits + spec.state_bits) / 8
            if used + need <= weight_cap:
                resident.add(layer)
                used += need
    return weights, resident


def _state_in_sram(
    counts: StepCounts, cfg: ChipConfig, widths: _Widths
) -> tuple[set[str], set[tuple[str, str]], list[str]]:
    """One core's state SRAM, per sample: first the live membrane potentials (FP) / error carries
    (BP) of every neuron layer, then the state saved for the backward pass in production order,
    the newest first (it is consumed first). The rest goes to DRAM.

    Returns the neuron layers whose live state fits, the saved (layer, part) items that fit
    (part: "spikes", "membrane", "input" or "data") and the names of what spills
    ("layer:live", "layer:part"). Capacity: `sram_kb` x (1 - `weight_sram_fraction`), bytes."""
    state_b, data_bits, membrane_bits = widths.state_b, widths.data_bits, widths.membrane_bits
    syn = counts.synaptic
    elements = list(counts.elements.values())
    state_cap = cfg.sram_kb * 1024 * (1 - cfg.weight_sram_fraction)
    live: dict[str, float] = defaultdict(float)
    saved: dict[tuple[str, str], float] = defaultdict(float)  # bytes per sample
    for layer in counts.layer_order:
        for r in elements:
            if r.layer == layer and r.kind == "neuron":
                live[layer] = max(live[layer], r.in_elems * state_b)
                saved[(layer, "spikes")] += r.in_elems * r.fp_calls / 8
                if membrane_bits:
                    saved[(layer, "membrane")] += r.in_elems * r.fp_calls * membrane_bits / 8
        for r in syn.values():
            if r.layer == layer and r.source == ACTIVATION:
                saved[(layer, "input")] += r.in_elems * state_b
            elif r.layer == layer and r.source == DATA:
                saved[(layer, "data")] += r.in_elems * data_bits / 8
    live_kept: set[str] = set()
    used = 0.0
    for layer, nbytes in live.items():
        if used + nbytes <= state_cap:
            live_kept.add(layer)
            used += nbytes
    kept: set[tuple[str, str]] = set()
    for item in reversed(list(saved)):
        if used + saved[item] <= state_cap:
            kept.add(item)
            used += saved[item]
    spilled = [f"{layer}:live" for layer in live if layer not in live_kept]
    spilled += [f"{layer}:{part}" for (layer, part) in saved if (layer, part) not in kept]
    return live_kept, kept, spilled


def _synaptic_rows(
    layout: _Layout,
    counts: StepCounts,
    cfg: ChipConfig,
    widths: _Widths,
    resident: set[str],
    kept: set[tuple[str, str]],
    first_fp: set[str],
) -> None:
    """The FP, BP and WG rows of every conv / linear record: engine work, SRAM bytes (inputs,
    outputs, weights per sample; bytes) and DRAM traffic (the input batch, first and re-fetched
    weight reads, layer inputs saved for WG that do not fit in SRAM). Marks in `first_fp` the
    layers whose parameters have been read."""
    batch = counts.batch_size
    state_b, weight_b, data_bits = widths.state_b, widths.weight_b, widths.data_bits
    spec, skip, recompute = cfg.spec, cfg.sparsity_skip, widths.recompute
    move, new_row = layout.move, layout.new_row
    for key, r in counts.synaptic.items():
        in_bits = 1 if r.binary else (data_bits if r.source == DATA else spec.state_bits)
        in_bytes = r.in_elems * batch * in_bits / 8
        out_bytes = r.out_elems * batch * state_b
        w_bytes = r.weights * weight_b
        is_resident = r.layer in resident
        # FP
        row = new_row(r.layer, "fp", r.time_step, r.kind)
        row.binary, row.dense_ops, row.ops_slot = r.binary, r.dense * batch, (key, "fp")
        _set_load(row, (key, "fp"), skip in ("input", "dual"), r.dense, recompute)
        row.sram_bytes = in_bytes + out_bytes + w_bytes * batch
        row.density = ("in", key)
        if r.source == DATA:
            move(row, "input", "read", r.in_elems * batch * data_bits / 8)
        if r.layer not in first_fp:
            first_fp.add(r.layer)
            move(row, "weights", "read", counts.params.get(r.layer, r.weights) * weight_b)
            if not is_resident and recompute == 2:
                move(row, "weights", "read", w_bytes)
        elif not is_resident:
            move(row, "weights", "read", w_bytes * recompute)
        if r.source == ACTIVATION and (r.layer, "input") not in kept:
            move(row, "saved_state", "written", r.in_elems * batch * state_b)
        # BP
        if r.bp is not None and r.bp_needed:
            row = new_row(r.layer, "bp", r.time_step, r.kind)
            row.dense_ops, row.ops_slot = r.dense * batch, (key, "bp")
            _set_load(row, (key, "bp"), skip in ("output", "dual"), r.dense)
            row.sram_bytes = out_bytes + r.in_elems * batch * state_b + w_bytes * batch
            row.density = ("err", key)
            if not is_resident:
                move(row, "weights", "read", w_bytes)
        # WG
        if r.wg is not None and r.wg_needed:
            row = new_row(r.layer, "wg", r.time_step, r.kind)
            row.binary, row.dense_ops, row.ops_slot = r.binary, r.dense * batch, (key, "wg")
            slot = {"dual": "wg", "input": "fp", "output": "bp", "none": None}[skip]
            _set_load(row, (key, slot) if slot else None, slot is not None, r.dense)
            row.sram_bytes = in_bytes + out_bytes + 2 * r.weights * state_b * batch
            if r.source == ACTIVATION and (r.layer, "input") not in kept:
                move(row, "saved_state", "read", r.in_elems * batch * state_b)
            if r.source == DATA and (r.layer, "data") not in kept:
                move(row, "input", "read", r.in_elems * batch * data_bits / 8)


def _element_rows(
    layout: _Layout,
    counts: StepCounts,
    widths: _Widths,
    live_kept: set[str],
    kept: set[tuple[str, str]],
    first_fp: set[str],
) -> None:
    """The vector-unit rows of every neuron, BatchNorm and pooling record: element ops per
    sample, SRAM bytes, and DRAM traffic for saved spikes / membrane and live state that do not
    fit (bytes); a layer's own parameters (BN affine, neuron constants) are read once."""
    batch, steps = counts.batch_size, counts.time_steps
    state_b, weight_b = widths.state_b, widths.weight_b
    membrane_bits, recompute = widths.membrane_bits, widths.recompute
    move, new_row = layout.move, layout.new_row
    for key, r in counts.elements.items():
        n_fp = r.in_elems * r.fp_calls
        n_bp = r.in_elems * r.bp_calls
        row = new_row(r.layer, "fp", r.time_step, r.kind)
        if r.kind == "neuron":
            per = NEURON_OPS + r.leak
            row.vector_per_sample = n_fp * per * recompute
            row.density = ("spikes", key)
            spike_b, mem_b = n_fp * batch / 8, n_fp * batch * membrane_bits / 8
            row.sram_bytes = n_fp * batch * 3 * state_b + spike_b
            for part, nbytes in (("spikes", spike_b), ("membrane", mem_b)):
                if (r.layer, part) in kept:
                    row.sram_bytes += nbytes
                else:
                    move(row, "saved_state", "written", nbytes)
            live_b = n_fp * batch * state_b  # the potential carried to the next time step
            if r.layer not in live_kept:
                if r.time_step > 0:
                    move(row, "working_state", "read", live_b)
                if r.time_step < steps - 1:
                    move(row, "working_state", "written", live_b)
            if r.bp_calls:
                row = new_row(r.layer, "bp", r.time_step, r.kind)
                row.vector_per_sample = n_bp * per
                spike_b, mem_b = n_bp * batch / 8, n_bp * batch * membrane_bits / 8
                row.sram_bytes = n_bp * batch * 4 * state_b
                for part, nbytes in (("spikes", spike_b), ("membrane", mem_b)):
                    if (r.layer, part) in kept:
                        row.sram_bytes += nbytes
                    else:
                        move(row, "saved_state", "read", nbytes)
                live_b = n_bp * batch * state_b  # the error carried to the previous step
                if r.layer not in live_kept:
                    if r.time_step < steps - 1:
                        move(row, "working_state", "read", live_b)
                    if r.time_step > 0:
                        move(row, "working_state", "written", live_b)
        elif r.kind == "norm":
            row.vector_per_sample = n_fp * NORM_FP_OPS[r.training]
            row.sram_bytes = n_fp * batch * (3 if r.training else 2) * state_b
            if r.bp_calls:
                row = new_row(r.layer, "bp", r.time_step, r.kind)
                row.vector_per_sample = n_bp * NORM_BP_OPS
                row.sram_bytes = n_bp * batch * 3 * state_b
                if r.has_params:
                    row = new_row(r.layer, "wg", r.time_step, r.kind)
                    row.vector_per_sample = n_bp * NORM_WG_OPS
                    row.sram_bytes = n_bp * batch * 2 * state_b
        else:  # pool
            out_fp = r.out_elems * r.fp_calls
            row.vector_per_sample = n_fp
            in_b = 1 / 8 if r.in_spikes else state_b
            row.sram_bytes = batch * (n_fp * in_b + out_fp * state_b)
            if r.bp_calls:
                row = new_row(r.layer, "bp", r.time_step, r.kind)
                row.vector_per_sample = n_bp
                row.sram_bytes = batch * (n_bp + r.out_elems * r.bp_calls) * state_b
        if r.kind != "pool" and r.layer not in first_fp and counts.params.get(r.layer):
            first_fp.add(r.layer)  # parameters (BN affine, neuron constants) read once
            move(layout.by_key[(r.layer, "fp")][0], "weights", "read",
                 counts.params[r.layer] * weight_b)


def _gradient_partials(
    layout: _Layout, weights: dict[str, int], resident: set[str], state_b: float
) -> None:
    """Gradient partials of layers whose accumulators do not fit: written after every backward
    time step but the last, read before every one but the first (time runs backwards); each
    transfer is the layer's weights x `state_b` bytes."""
    for (layer, phase), group in list(layout.by_key.items()):
        if phase == "wg" and layer in weights and layer not in resident and len(group) > 1:
            g_bytes = weights[layer] * state_b
            ordered = sorted(group, key=lambda row: row.time_step)
            for row in ordered[1:]:
                layout.move(row, "gradients", "written", g_bytes)
            for row in ordered[:-1]:
                layout.move(row, "gradients", "read", g_bytes)


def _optimizer_updates(
    layout: _Layout, counts: StepCounts, cfg: ChipConfig, widths: _Widths
) -> None:
    """Optimizer update of every module that received gradients, after its last backward row
    (the WG row of time step 0, or a new one): vector ops `OPTIMIZER_OPS` per parameter, SRAM
    bytes, optimizer state read and written and updated weights written to DRAM (bytes)."""
    state_b, weight_b = widths.state_b, widths.weight_b
    syn, elements = counts.synaptic, list(counts.elements.values())
    updated = {r.layer for r in syn.values() if r.wg is not None and r.wg_needed}
    updated |= {r.layer for r in elements if r.bp_calls and r.kind != "pool"}
    n_states = OPTIMIZER_STATES[cfg.optimizer]
    for layer in counts.layer_order:
        n_params = counts.params.get(layer, 0)
        if not n_params or layer not in updated:
            continue
        group = layout.by_key.get((layer, "wg"))
        if group:
            row = min(group, key=lambda row: row.time_step)
        else:
            kind = next(r.kind for r in layout.rows if r.layer == layer)
            row = layout.new_row(layer, "wg", 0, kind)
        row.vector_global += n_params * OPTIMIZER_OPS[cfg.optimizer]
        row.sram_bytes += n_params * (2 * weight_b + state_b * (1 + 2 * n_states))
        layout.move(row, "optimizer_state", "read", n_params * n_states * state_b)
        layout.move(row, "optimizer_state", "written", n_params * n_states * state_b)
        layout.move(row, "weights", "written", n_params * weight_b)


def _add_row(cost: StepCost, row: _Row, cycles: int, executed: float, flops: float,
             core_pj: dict[str, float]) -> None:
    """Add one row's contribution (static part, or the dynamic synaptic part) to `cost`."""
    static = "vector" in core_pj
    cost.engine_cycles[row.phase] += cycles
    cost.executed_ops[row.phase] += round(executed)
    cost.flops += round(flops)
    core_j = sum(core_pj.values()) * 1e-12
    dram_j = row.dram_pj * 1e-12 if static else 0.0
    for part, pj in core_pj.items():
        cost.energy_by_part[part] += pj * 1e-12
    cost.core_energy_j += core_j
    cost.energy_j += core_j + dram_j
    cost.energy_by_phase[row.phase] += core_j + dram_j
    if static:
        cost.dense_ops[row.phase] += round(row.dense_ops)
        cost.neuron_ops += round(row.vector_ops)
        cost.sram_bytes += round(row.sram_bytes)
        cost.dram_energy_j += dram_j
        cost.energy_by_part["dram"] += dram_j


# -- the GPU baseline ------------------------------------------------------------------------
class SavedTensorMeter:
    """Measures the tensors autograd saves for the backward pass (use around the forward).

    Parameters and buffers are left out (the baseline counts their traffic separately). A tensor
    saved by several ops is written once and read once per saving op."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._skip = {t.untyped_storage().data_ptr() for t in model.parameters()}
        self._skip |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        self._seen: set[tuple] = set()
        self.written = 0
        self.read = 0
        self._ctx: Any = None

    def _pack(self, t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._skip:
            nbytes = t.numel() * t.element_size()
            key = (ptr, t.storage_offset(), t.numel(), t.dtype)
            if key not in self._seen:
                self._seen.add(key)
                self.written += nbytes
            self.read += nbytes
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def gpu_baseline(
    meter: SavedTensorMeter, model: torch.nn.Module, x: Tensor, optimizer: str
) -> dict[str, Any]:
    """DRAM bytes of the same eager step on an A100 (see the module docstring)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    n_states = OPTIMIZER_STATES[optimizer]
    param_traffic = params * (6 + 2 * n_states)
    input_bytes = x.numel() * x.element_size()
    total = input_bytes + meter.written + meter.read + param_traffic
    return {
        "device": "A100",
        "dram_bytes": total,
        "input_bytes": input_bytes,
        "saved_written_bytes": meter.written,
        "saved_read_bytes": meter.read,
        "parameter_bytes": param_traffic,
        "dram_seconds": total / (A100_DRAM_GBPS.value * 1e9),
        "source": A100_DRAM_GBPS.source,
    }
