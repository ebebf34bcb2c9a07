"""shared.neurocore.cost: the cost model's physics, its cached plans and the A100 baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.neurocore import ChipConfig, NeuroCore
from shared.neurocore.cost import StepPlan, _best_split, cost_step, structure_key
from shared.snn import build_model

PAPER = ChipConfig.preset("paper-28nm-fp16")
EDGE = ChipConfig.preset("edge-int8")


@pytest.fixture(scope="module")
def csnn_counts(rand_batch):
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=16, time_steps=4)
    x = rand_batch((12, 1, 16, 16), seed=5)
    counts, gpu = NeuroCore(PAPER).trace(model, x, torch.arange(12) % 10)
    return counts, gpu


def test_energy_rises_with_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 5))
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(6, 4, 8, 8, generator=gen)
    energies, ops = [], []
    for density in (0.0, 0.1, 0.3, 0.6, 0.9, 1.0):
        x = (noise < density).float()  # nested masks: each density contains the previous one
        report = NeuroCore(PAPER).profile(model, x, torch.arange(6) % 5, time_steps=1)
        energies.append(report.energy_j)
        ops.append(sum(r["ops"] for r in report.rows if r["phase"] == "fp"))
    assert all(a < b for a, b in zip(energies, energies[1:], strict=False))
    assert all(a < b for a, b in zip(ops, ops[1:], strict=False))


def test_more_cores_never_increase_cycles(csnn_counts):
    counts, _ = csnn_counts
    for base in (PAPER, EDGE, PAPER.replace(sparsity_skip="none", sram_kb=16, sram_bank_kb=8)):
        previous = None
        for cores in range(1, 25):
            cost = NeuroCore(base.replace(cores=cores)).cost(counts)
            row_cycles = [r["cycles"] for r in cost.rows]
            if previous is not None:
                assert cost.cycles <= previous[0]
                assert all(a <= b for a, b in zip(row_cycles, previous[1], strict=True))
            previous = (cost.cycles, row_cycles)
        assert previous[0] < NeuroCore(base.replace(cores=1)).cost(counts).cycles


@pytest.mark.parametrize("membrane", ["store", "mask", "recompute"])
@pytest.mark.parametrize("sram_kb", [4, 64, 4096])
def test_every_byte_written_is_read_back(csnn_counts, membrane, sram_kb):
    counts, _ = csnn_counts
    cost = NeuroCore(PAPER.replace(membrane=membrane, sram_kb=sram_kb, sram_bank_kb=4)).cost(counts)
    for category, entry in cost.ledger.items():
        assert entry["read"] >= entry["written"], category
        if category != "weights":  # new weights are read by the next step
            assert entry["read"] == entry["written"] or category == "input", category
    assert cost.ledger["weights"]["written"] > 0 and cost.ledger["input"]["written"] == 0
    assert sum(r["dram_bytes"] for r in cost.rows) == cost.dram_bytes
    if sram_kb == 4:
        assert cost.ledger["saved_state"]["written"] > 0
        assert cost.ledger["gradients"]["written"] > 0  # conv2 / fc accumulators do not fit
        if membrane == "store":
            assert cost.ledger["working_state"]["written"] > 0
    if sram_kb == 4096:
        assert cost.ledger["saved_state"]["written"] == 0 == cost.ledger["gradients"]["written"]


@pytest.mark.parametrize(("batch", "cores"), [(1, 4), (5, 3), (32, 20), (7, 64), (300, 200)])
def test_core_split_is_the_best_round_robin_deal(batch, cores):
    gen = torch.Generator().manual_seed(batch * cores)
    loads = torch.randint(0, 1000, (6, batch), generator=gen).double()
    best, k_best = _best_split(loads, cores)  # (300, 200) takes the one-k-at-a-time path
    for r in range(6):
        worst = {k: max(float(loads[r, c::k].sum()) for c in range(k))
                 for k in range(1, min(cores, batch) + 1)}
        assert float(best[r]) == min(worst.values())
        assert int(k_best[r]) == min(k for k, v in worst.items() if v == min(worst.values()))


def test_integer_precisions_cost_less_energy_than_fp16(csnn_counts):
    counts, _ = csnn_counts
    for chip in (PAPER, EDGE):
        energy = {p: NeuroCore(chip.replace(precision=p)).cost(counts).energy_j
                  for p in ("fp16", "int8", "int4")}
        assert energy["int4"] < energy["int8"] < energy["fp16"]


def test_skip_modes_and_membrane_strategies(csnn_counts):
    counts, _ = csnn_counts
    none = NeuroCore(PAPER.replace(sparsity_skip="none")).cost(counts)
    dual = NeuroCore(PAPER).cost(counts)
    assert none.executed_ops == none.dense_ops
    assert dual.executed_ops == dual.ops
    assert dual.ops["fp"] < dual.dense_ops["fp"] and dual.ops["wg"] < dual.dense_ops["wg"]
    assert dual.ops["bp"] <= dual.dense_ops["bp"]  # BatchNorm's backward makes errors dense
    assert dual.energy_j < none.energy_j and dual.cycles <= none.cycles
    only_in = NeuroCore(PAPER.replace(sparsity_skip="input")).cost(counts)
    assert only_in.executed_ops["fp"] == dual.ops["fp"] == only_in.executed_ops["wg"]
    recompute = NeuroCore(PAPER.replace(membrane="recompute")).cost(counts)
    assert recompute.executed_ops["fp"] == 2 * dual.executed_ops["fp"]
    mask = NeuroCore(PAPER.replace(membrane="mask")).cost(counts)
    assert mask.dram_bytes <= dual.dram_bytes and recompute.dram_bytes <= mask.dram_bytes


def test_a_cached_plan_costs_other_steps_exactly_and_rows_add_up(csnn_counts, rand_batch):
    counts, _ = csnn_counts
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=16, time_steps=4)
    x = rand_batch((12, 1, 16, 16), seed=9)
    other, _ = NeuroCore(PAPER).trace(model, x, torch.arange(12) % 10)
    assert structure_key(other) == structure_key(counts)
    for cfg in (PAPER, EDGE, PAPER.replace(sparsity_skip="output", membrane="recompute")):
        fast = StepPlan(counts, cfg, energy_scale=NeuroCore(cfg).energy_scale).cost(other)
        full = NeuroCore(cfg).cost(other)
        for name in ("cycles", "compute_cycles", "dram_cycles", "engine_cycles", "ops",
                     "executed_ops", "dense_ops", "neuron_ops", "flops", "sram_bytes",
                     "dram_bytes", "ledger"):
            assert getattr(fast, name) == getattr(full, name), name
        assert fast.energy_j == pytest.approx(full.energy_j, rel=1e-12)
        assert fast.imbalance == pytest.approx(full.imbalance, rel=1e-12)
        rows = full.rows
        assert sum(r["energy_j"] for r in rows) == pytest.approx(full.energy_j, rel=1e-9)
        assert sum(r["flops"] for r in rows) == pytest.approx(full.flops, abs=len(rows))
        for phase in ("fp", "bp", "wg"):
            mine = [r for r in rows if r["phase"] == phase]
            assert sum(r["cycles"] for r in mine) == full.engine_cycles[phase]
            assert sum(r["ops"] for r in mine) == full.ops[phase]
            assert sum(r["executed_ops"] for r in mine) == full.executed_ops[phase]


@pytest.fixture(scope="module")
def mnist_batch():
    from shared.data import load_dataset

    x, y = load_dataset("mnist-subset", "test").tensors
    return x[:32], y[:32]


@pytest.mark.parametrize("name", ["csnn", "resnet-mini"])
def test_dram_reduction_vs_a100_is_within_the_papers_range(mnist_batch, name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, input_size=28, time_steps=4)
    report = NeuroCore(PAPER).profile(model, *mnist_batch)
    assert 0.55 <= report.dram_reduction <= 0.85
    gpu = report.gpu
    assert gpu["saved_written_bytes"] > 0 and gpu["saved_read_bytes"] >= gpu["saved_written_bytes"]


def test_the_cost_model_applies_the_factor_it_is_given(csnn_counts):
    counts, _ = csnn_counts
    with pytest.raises(ValueError, match="left to calibration"):
        StepPlan(counts, PAPER)  # no factor: the chip model (NeuroCore) resolves it
    chip = NeuroCore(PAPER)
    given = cost_step(counts, PAPER, energy_scale=chip.energy_scale)
    assert given.energy_j == chip.cost(counts).energy_j
    fixed = PAPER.replace(core_energy_scale=chip.energy_scale)  # the config's own factor
    assert cost_step(counts, fixed).energy_j == given.energy_j
    double = cost_step(counts, PAPER, energy_scale=2 * chip.energy_scale)
    assert double.core_energy_j == pytest.approx(2 * given.core_energy_j, rel=1e-12)
    assert double.dram_energy_j == given.dram_energy_j and double.cycles == given.cycles
