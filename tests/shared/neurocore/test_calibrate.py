"""shared.neurocore.calibrate: the core-energy factor and the headline 1.05 TFLOPS/W."""

from __future__ import annotations

import pytest

from shared.neurocore import ChipConfig, NeuroCore, dense_workload_tflops_per_w
from shared.neurocore.calibrate import (
    _scale,
    calibration_scale,
    reference_counts,
    resolve_energy_scale,
)

PAPER = ChipConfig.preset("paper-28nm-fp16")
EDGE = ChipConfig.preset("edge-int8")


def test_paper_preset_is_calibrated_to_1_05_tflops_per_w():
    reference = NeuroCore(PAPER.replace(sparsity_skip="none")).cost(reference_counts())
    assert reference.tflops_per_w == pytest.approx(1.05, rel=1e-9)
    measured = dense_workload_tflops_per_w(PAPER)
    assert measured == pytest.approx(1.05, rel=0.05)
    raw = PAPER.replace(core_energy_scale=1.0)
    assert dense_workload_tflops_per_w(raw) > 1.5  # Horowitz datapath alone, before overheads
    assert calibration_scale(EDGE) == pytest.approx(
        calibration_scale(PAPER.replace(cores=4, sram_bank_kb=8)), rel=0.05)


def test_the_factor_is_the_fp16_twins_and_a_given_factor_wins():
    assert calibration_scale(EDGE) == calibration_scale(
        EDGE.replace(precision="fp16", sparsity_skip="input"))
    assert calibration_scale(EDGE) != calibration_scale(PAPER)
    assert resolve_energy_scale(EDGE) == calibration_scale(EDGE) == NeuroCore(EDGE).energy_scale
    assert resolve_energy_scale(EDGE.replace(core_energy_scale=3.0)) == 3.0
    assert NeuroCore(EDGE.replace(core_energy_scale=3.0)).energy_scale == 3.0


def test_calibration_runs_once_per_configuration():
    config = ChipConfig(cores=7, clock_mhz=321.0)  # a configuration no other test builds
    before = _scale.cache_info()
    chips = [NeuroCore(config) for _ in range(3)]
    chips.append(NeuroCore(config.replace(precision="int8")))  # the same fp16 twin
    after = _scale.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 3)
    assert len({chip.energy_scale for chip in chips}) == 1
