"""shared.neurocore: exact op counts against brute force, the cost model's physics, calibration,
the DRAM figure against the A100 baseline, reports and the command line."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from shared.neurocore import (
    ChipConfig,
    ChipConfigError,
    NeuroCore,
    calibration_scale,
    dense_workload_tflops_per_w,
)
from shared.neurocore.__main__ import main as cli_main
from shared.neurocore.calibrate import reference_counts
from shared.neurocore.cost import StepPlan, _best_split, structure_key
from shared.quant import quantize
from shared.snn import build_model

PAPER = ChipConfig.preset("paper-28nm-fp16")
EDGE = ChipConfig.preset("edge-int8")


# -- the independent reference: hooks that keep x and dy, then convolutions of the masks --------
class BruteForce:
    """Per (layer, phase, time step) counts from the definitions, on the same step as the tracer:
    FP = sum conv2d(nz(x), 1), BP = sum conv2d_input(nz(dy), 1), WG = sum conv2d_weight(nz(x),
    nz(dy)) (float64), and the Linear equivalents with matrix products."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict] = []
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
        ]

    def _hook(self, name):
        def hook(module, args, out):
            call = {"name": name, "m": module, "x": args[0].detach().clone(),
                    "x_grad": args[0].requires_grad, "dy": None}
            self.calls.append(call)
            if out.requires_grad:
                out.register_hook(lambda g: call.__setitem__("dy", g.detach().clone()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def counts(self, steps: int, batch: int) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = defaultdict(int)
        for c in self.calls:
            per_row = (self._conv if isinstance(c["m"], nn.Conv2d) else self._linear)(c)
            rows = per_row["fp"].shape[0]
            assert rows in (steps * batch, batch)
            n_t = steps if rows == steps * batch else 1  # time-flattened, or a head run once
            for phase, values in per_row.items():
                for t, value in enumerate(values.view(n_t, -1).sum(1).tolist()):
                    out[(c["name"], phase, t)] += round(value)
        return dict(out)

    @staticmethod
    def _conv(c: dict) -> dict[str, torch.Tensor]:
        m, dy = c["m"], c["dy"]
        nzx = (c["x"] != 0).double()
        pad = m.padding
        if m.padding_mode != "zeros":
            nzx, pad = F.pad(nzx, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        ones = torch.ones(m.weight.shape, dtype=torch.float64)
        geo = (m.stride, pad, m.dilation, m.groups)
        out = {"fp": F.conv2d(nzx, ones, None, *geo).flatten(1).sum(1)}
        if dy is not None:
            nzg = (dy != 0).double()
            if c["x_grad"]:
                out["bp"] = torch.nn.grad.conv2d_input(nzx.shape, ones, nzg, *geo).flatten(1).sum(1)
            out["wg"] = torch.stack([
                torch.nn.grad.conv2d_weight(nzx[n:n + 1], m.weight.shape, nzg[n:n + 1], *geo).sum()
                for n in range(nzx.shape[0])
            ])
        return out

    @staticmethod
    def _linear(c: dict) -> dict[str, torch.Tensor]:
        m, dy = c["m"], c["dy"]
        nzx = (c["x"] != 0).double().reshape(-1, m.weight.shape[1])
        ones = torch.ones(m.weight.shape, dtype=torch.float64)
        out = {"fp": (nzx @ ones.T).sum(1)}
        if dy is not None:
            nzg = (dy != 0).double().reshape(nzx.shape[0], -1)
            if c["x_grad"]:
                out["bp"] = (nzg @ ones).sum(1)
            out["wg"] = (nzg[:, :, None] * nzx[:, None, :]).flatten(1).sum(1)
        return out


def profile_with_brute(model, x, y, config=PAPER, **kwargs):
    brute = BruteForce(model)
    try:
        chip = NeuroCore(config)
        counts, gpu = chip.trace(model, x, y, **kwargs)
    finally:
        brute.remove()
    report = chip.report(counts, gpu)
    expected = brute.counts(counts.time_steps, counts.batch_size)
    got = {(r["layer"], r["phase"], r["time_step"]): r["ops"] for r in report.rows
           if r["kind"] in ("conv", "linear") and (r["ops"] or r["dense_ops"])}
    return report, got, expected


def batch(shape, seed=0, low=0.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * (1 - low) + low


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "input_size", "neuron"),
    [("csnn", 12, "lif"), ("mlp", 8, "if"), ("resnet-mini", 8, "lif")],
)
def test_counts_equal_brute_force_on_zoo_models(name, input_size, neuron):
    torch.manual_seed(1)
    model = build_model(name, in_channels=1, num_classes=10, input_size=input_size,
                        time_steps=3, neuron=neuron, threshold=0.5)
    x = batch((5, 1, input_size, input_size))
    y = torch.arange(5) % 10
    report, got, expected = profile_with_brute(model, x, y)
    assert got == expected
    phases = {p for (_, p, _) in got}
    assert phases == {"fp", "bp", "wg"}
    # the direct-coded head is counted once (t = 0); the body at every step
    assert {t for (layer, _, t) in got if layer in report.meta["counted_once"]} == {0}
    assert {t for (layer, _, t) in got if layer not in report.meta["counted_once"]} == {0, 1, 2}
    assert not any(layer == "conv1" or layer == "fc1" for (layer, p, _) in got if p == "bp")


def test_counts_equal_brute_force_on_event_frames_and_quantized_model():
    torch.manual_seed(2)
    model = quantize(build_model("csnn", in_channels=2, num_classes=10, input_size=8,
                                 time_steps=4, threshold=0.5), bits=4)
    x = (batch((4, 3, 2, 8, 8), seed=3) > 0.7).float()  # [T, B, C, H, W] binary events
    y = torch.arange(3)
    report, got, expected = profile_with_brute(model, x, y)
    assert got == expected
    assert report.meta["counted_once"] == []  # event frames: every layer per step
    assert {t for (_, _, t) in got} == {0, 1, 2, 3}


class _ScaledConv(nn.Conv2d):  # a subclass that changes the effective weight, not its shape
    def forward(self, x):
        return self._conv_forward(x, self.weight * 0.5, self.bias)


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    side=st.integers(5, 9),
    density=st.floats(0.05, 1.0),
    mode=st.sampled_from(["zeros", "zeros", "reflect"]),
    seed=st.integers(0, 10_000),
)
def test_factorised_conv_counts_equal_brute_force(kernel, stride, padding, dilation, groups, side,
                                                   density, mode, seed):
    if mode == "reflect" and padding >= side:
        mode = "zeros"
    assume(side + 2 * padding - dilation * (kernel - 1) >= 1)  # at least one output position
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = _ScaledConv(4, 6, kernel, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, padding_mode=mode)
    side_out = (side + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # makes the second layer's input need a gradient
        conv,
        nn.Flatten(),
        nn.Linear(6 * side_out**2, 5),
    )
    with torch.no_grad():  # sparse weights: zeros in the activations and in the errors
        for layer in (model[0], model[3]):
            keep = torch.rand(layer.weight.shape, generator=gen) < density
            layer.weight.copy_(torch.where(keep, layer.weight, 0.0))
    x = (torch.rand(3, 2, side, side, generator=gen) < density).float()
    target = torch.randn(3, 5, generator=gen) * (torch.rand(3, 5, generator=gen) < density)
    _, got, expected = profile_with_brute(
        model, x, target, loss_fn=lambda out, t: (out * t).sum(), time_steps=1
    )
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}


def test_density_one_reproduces_the_dense_count():
    torch.manual_seed(0)
    for layer, shape in (
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 9)),
        (nn.Conv2d(2, 4, (3, 5), padding=(2, 1), dilation=(1, 2)), (4, 2, 8, 10)),
        (nn.Linear(7, 3), (4, 7)),
    ):
        x = torch.ones(shape, requires_grad=True)  # binary input of density 1
        model = nn.Sequential(layer)
        counts, _ = NeuroCore(PAPER).trace(
            model, x, None, loss_fn=lambda out, _: (out * torch.linspace(1, 2, out.numel())
                                                    .view(out.shape)).sum(), time_steps=1)
        (rec,) = counts.synaptic.values()
        batch_size = shape[0]
        if isinstance(layer, nn.Conv2d):
            ones = torch.ones(layer.weight.shape, dtype=torch.float64)
            dense = F.conv2d(torch.ones(shape, dtype=torch.float64), ones, None, layer.stride,
                             layer.padding, layer.dilation).sum()
        else:
            dense = torch.tensor(float(layer.weight.numel() * batch_size))
        assert rec.dense * batch_size == int(dense)
        for phase in (rec.fp, rec.bp, rec.wg):
            assert int(phase.sum()) == int(dense)
        assert rec.binary and rec.bp_needed


# -- physics of the cost model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def csnn_counts():
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=16, time_steps=4)
    x = batch((12, 1, 16, 16), seed=5)
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


def test_a_cached_plan_costs_other_steps_exactly_and_rows_add_up(csnn_counts):
    counts, _ = csnn_counts
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=16, time_steps=4)
    other, _ = NeuroCore(PAPER).trace(model, batch((12, 1, 16, 16), seed=9), torch.arange(12) % 10)
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


# -- calibration and the headline figures ---------------------------------------------------------
def test_paper_preset_is_calibrated_to_1_05_tflops_per_w():
    reference = NeuroCore(PAPER.replace(sparsity_skip="none")).cost(reference_counts())
    assert reference.tflops_per_w == pytest.approx(1.05, rel=1e-9)
    measured = dense_workload_tflops_per_w(PAPER)
    assert measured == pytest.approx(1.05, rel=0.05)
    raw = PAPER.replace(core_energy_scale=1.0)
    assert dense_workload_tflops_per_w(raw) > 1.5  # Horowitz datapath alone, before overheads
    assert calibration_scale(EDGE) == pytest.approx(
        calibration_scale(PAPER.replace(cores=4, sram_bank_kb=8)), rel=0.05)


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


# -- the API contract ----------------------------------------------------------------------------
def test_profile_leaves_the_model_unchanged_and_fills_the_report():
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = NeuroCore(ChipConfig(cores=4, precision="fp16")).profile(
        model, batch((6, 1, 8, 8)), torch.arange(6))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    keys = {"layer", "phase", "time_step", "ops", "neuron_ops", "cycles", "sram_bytes",
            "dram_bytes", "energy_j"}
    assert report.rows and all(keys <= row.keys() for row in report.rows)
    names = dict(model.named_modules())
    assert all(row["layer"] in names for row in report.rows)
    assert {row["phase"] for row in report.rows} == {"fp", "bp", "wg"}
    assert report.energy_j == pytest.approx(sum(r["energy_j"] for r in report.rows))
    assert report.cycles > 0 and report.dram_bytes > 0 and report.gpu_dram_bytes > 0
    sn = [r for r in report.rows if r["layer"] == "sn1"]
    assert all(r["neuron_ops"] > 0 and r["ops"] == 0 for r in sn)


def test_accountant_counts_real_training_steps_exactly_without_extra_passes():
    torch.manual_seed(0)
    model = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8,
                                 time_steps=2, threshold=0.5), bits=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    forwards = []
    model.fc.register_forward_hook(lambda *args: forwards.append(1))
    brute = BruteForce(model)
    with NeuroCore(EDGE).accountant(model) as acc:
        for step in range(3):
            x, y = batch((8, 1, 8, 8), seed=step), torch.arange(8)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            acc.step()
    brute.remove()
    assert len(forwards) == 3 and acc.total.steps == 3  # one forward per step, none added
    expected = brute.counts(steps=2, batch=8)
    for phase in ("fp", "bp", "wg"):
        assert acc.total.ops[phase] == sum(v for (_, p, _), v in expected.items() if p == phase)
    assert acc.total.energy_j > 0 and acc.total.cycles > 0 and acc.total.dram_bytes > 0
    assert 0 < acc.total.spike_density < 1


def test_bad_config_values_fail_with_one_clear_line():
    cases = [
        ({"cores": 0}, "cores=0 is not allowed"),
        ({"precision": "fp8"}, "precision='fp8' is not allowed: Input should be 'fp16', 'int8'"),
        ({"sparsity_skip": "all"}, "sparsity_skip='all'"),
        ({"clock_mhz": -1}, "clock_mhz=-1"),
        ({"sram_kb": 8, "sram_bank_kb": 16}, "larger than the core's SRAM"),
        ({"lanes": 3}, "lanes=3 is not allowed: Extra inputs are not permitted"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ChipConfigError) as info:
            ChipConfig(**kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ChipConfigError, match="unknown chip preset 'tpu'; choose one of"):
        ChipConfig.preset("tpu")


def test_energy_constants_carry_their_sources():
    constants = PAPER.energy_constants()
    assert all(c["source"] for c in constants.values())
    assert "Horowitz" in constants["sram"]["source"]
    assert "user" not in constants["dram"]["source"]
    assert "set in this configuration" in PAPER.replace(dram_pj_per_bit=5).energy_constants()[
        "dram"]["source"]


def test_command_line_writes_report_and_plots(tmp_path, capsys):
    out = tmp_path / "nc"
    code = cli_main(["--model", "mlp", "--dataset", "digits", "--batch-size", "8",
                     "--time-steps", "2", "--cores", "1,4,2", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert data["estimate"] and data["rows"]
    assert [e["cores"] for e in data["core_sweep"]] == [1, 2, 4]
    assert data["calibration"]["dense_workload_tflops_per_w_fp16"] == pytest.approx(1.05, rel=0.05)
    for name in ("rows.csv", "core_scaling.csv", "energy_by_phase.png", "core_scaling.png",
                 "sparsity_heatmap.png", "dram_vs_gpu.png"):
        assert (out / name).stat().st_size > 0
    assert "less" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cores", "0,2"], "core counts must be >= 1"),
        (["--cores", "two"], "not a comma-separated list"),
        (["--preset", "gpu"], "unknown chip preset 'gpu'"),
        (["--precision", "fp8"], "precision='fp8' is not allowed"),
        (["--model", "vgg"], "--model 'vgg' is not one of"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--chip-cores", "0"], "cores=0 is not allowed"),
    ],
)
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    assert cli_main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
