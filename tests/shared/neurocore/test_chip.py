"""shared.neurocore.chip: NeuroCore.profile and the Accountant on real training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.neurocore import ChipConfig, NeuroCore
from shared.quant import quantize
from shared.snn import build_model

EDGE = ChipConfig.preset("edge-int8")


def test_profile_leaves_the_model_unchanged_and_fills_the_report(rand_batch):
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = NeuroCore(ChipConfig(cores=4, precision="fp16")).profile(
        model, rand_batch((6, 1, 8, 8)), torch.arange(6))
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


def test_accountant_counts_real_training_steps_exactly_without_extra_passes(
    brute_force, rand_batch
):
    torch.manual_seed(0)
    model = quantize(build_model("csnn", in_channels=1, num_classes=10, input_size=8,
                                 time_steps=2, threshold=0.5), bits=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    forwards = []
    model.fc.register_forward_hook(lambda *args: forwards.append(1))
    brute = brute_force(model)
    with NeuroCore(EDGE).accountant(model) as acc:
        for step in range(3):
            x, y = rand_batch((8, 1, 8, 8), seed=step), torch.arange(8)
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
