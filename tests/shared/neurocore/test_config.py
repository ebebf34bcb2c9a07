"""shared.neurocore.config: validation, energy constants with sources, a value without the chip."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import UserError
from shared.neurocore import ChipConfig, ChipConfigError

PAPER = ChipConfig.preset("paper-28nm-fp16")
ROOT = Path(__file__).resolve().parents[3]


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
        assert isinstance(info.value, UserError) and info.value.exit_code == 2
    with pytest.raises(ChipConfigError, match="unknown chip preset 'tpu'; choose one of"):
        ChipConfig.preset("tpu")


def test_energy_constants_carry_their_sources():
    constants = PAPER.energy_constants()
    assert all(c["source"] for c in constants.values())
    assert "Horowitz" in constants["sram"]["source"]
    assert "user" not in constants["dram"]["source"]
    assert "set in this configuration" in PAPER.replace(dram_pj_per_bit=5).energy_constants()[
        "dram"]["source"]


def test_a_config_is_a_plain_value():
    edge, twin = ChipConfig.preset("edge-int8"), ChipConfig.preset("edge-int8")
    assert edge == twin and hash(edge) == hash(twin)
    assert edge.core_energy_scale is None  # left to calibration, which the chip model does
    assert edge.replace(cores=2).core_energy_scale is None
    assert edge.replace(core_energy_scale=2.0).replace(cores=2).core_energy_scale == 2.0
    entry = edge.energy_constants(1.5)["core_energy_scale"]
    assert entry["value"] == 1.5 and entry["source"].startswith("calibrated")
    assert edge.energy_constants()["core_energy_scale"]["value"] is None


def test_importing_the_config_loads_neither_calibration_nor_the_chip():
    code = (
        "import sys\n"
        "import shared.neurocore.config\n"
        "from shared.neurocore import PRESETS, ChipConfig\n"
        "ChipConfig.preset(next(iter(PRESETS))).replace(cores=2).energy_constants()\n"
        "print(sorted(m for m in sys.modules if m.startswith('shared.neurocore')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(ast.literal_eval(done.stdout.strip()))
    assert "shared.neurocore.config" in loaded
    assert not loaded & {"shared.neurocore.calibrate", "shared.neurocore.chip"}, loaded
