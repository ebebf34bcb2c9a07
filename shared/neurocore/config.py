"""The chip's configuration, its energy constants (each with its source) and the presets.

Energy per operation comes from one table of 45 nm figures (Horowitz, ISSCC 2014) scaled to the
configured technology node; every value the cost model uses can be listed with its source by
`ChipConfig.energy_constants()`. A dense fp16 MAC at 28 nm costs about 0.93 pJ in that table, but a
real core also spends energy on control, clock tree, local buffers and leakage, which the model
does not enumerate. The calibration mode folds all of that into one factor, `core_energy_scale`,
chosen so that a dense fp16 workload (`shared.neurocore.calibrate.REFERENCE`) reaches the target
efficiency, 1.05 TFLOPS/W by default (Li et al. 2024). A `ChipConfig` is a plain value: with
`core_energy_scale=None` the factor is derived when the chip model is built (`NeuroCore`,
`shared.neurocore.calibrate.resolve_energy_scale`); it is always derived at fp16 (the
configuration's fp16 twin), so int8 and int4 chips carry the same overhead factor and keep their
cheaper datapaths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import UserError

HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, Fig. 1.1.9 (45 nm, 0.9 V)"
LI_2024 = "Li et al., 'A High Energy-Efficiency Multi-core Neuromorphic Architecture for Deep SNN "
LI_2024 += "Training', arXiv:2412.05302 (2024)"
A100_DATASHEET = "NVIDIA A100 Tensor Core GPU datasheet (40 GB HBM2, 2020)"


class ChipConfigError(UserError, ValueError):
    """A bad chip configuration value (one line: what is wrong and what is allowed)."""


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str


# Energy of one operation at 45 nm, pJ.
OP_ENERGY_45NM: dict[str, Constant] = {
    "fp16_mul": Constant(1.1, "pJ", HOROWITZ),
    "fp16_add": Constant(0.4, "pJ", HOROWITZ),
    "fp32_mul": Constant(3.7, "pJ", HOROWITZ),
    "fp32_add": Constant(0.9, "pJ", HOROWITZ),
    "int8_mul": Constant(0.2, "pJ", HOROWITZ),
    "int8_add": Constant(0.03, "pJ", HOROWITZ),
    "int32_mul": Constant(3.1, "pJ", HOROWITZ),
    "int32_add": Constant(0.1, "pJ", HOROWITZ),
    "int16_add": Constant(
        0.03 + (0.1 - 0.03) * (16 - 8) / (32 - 8),
        "pJ",
        "interpolated from Horowitz's int8 and int32 adds (adder energy linear in width)",
    ),
    "int4_mul": Constant(
        0.2 * (4 / 8) ** 2,
        "pJ",
        "Horowitz's int8 mul scaled by (4/8)^2 (array multiplier energy ~ bits^2)",
    ),
}
SRAM_64B_8KB = Constant(10.0, "pJ per 64-bit read, 8 KB array", HOROWITZ)
SRAM_64B_1MB = Constant(100.0, "pJ per 64-bit read, 1 MB array", HOROWITZ)
SRAM_RULE = (
    "E(bank) = 10 pJ * sqrt(bank / 8 KB) per 64 bits at 45 nm: fits Horowitz's 8 KB (10 pJ) and "
    "1 MB (100 pJ; the rule gives 113) end points"
)
DRAM_64B = Constant(1300.0, "pJ per 64 bits", HOROWITZ + ", DRAM 1.3-2.6 nJ per 64 bits (low end)")
TECH_RULE = "first-order node scaling: dynamic energy proportional to feature size at fixed voltage"
A100_DRAM_GBPS = Constant(1555.0, "GB/s", A100_DATASHEET)
A100_FP16_TFLOPS = Constant(312.0, "TFLOPS (dense fp16 tensor core)", A100_DATASHEET)
TARGET_TFLOPS_PER_W = Constant(1.05, "TFLOPS/W at fp16, 28 nm", LI_2024)


@dataclass(frozen=True)
class PrecisionSpec:
    """Bit widths and energy-table keys of a datapath precision.

    Weights are stored at `weight_bits`; membrane potentials, errors and gradient accumulators at
    `state_bits`; analog input pixels at `input_bits`. A MAC is a `mul` at weight precision plus an
    `add` at state precision; a spike-driven accumulate (AC) and every vector-unit op is one `add`.
    """

    weight_bits: int
    state_bits: int
    input_bits: int
    mul: str
    add: str


PRECISIONS: dict[str, PrecisionSpec] = {
    "fp32": PrecisionSpec(32, 32, 32, "fp32_mul", "fp32_add"),
    "fp16": PrecisionSpec(16, 16, 16, "fp16_mul", "fp16_add"),
    "int8": PrecisionSpec(8, 16, 8, "int8_mul", "int16_add"),
    "int4": PrecisionSpec(4, 8, 8, "int4_mul", "int8_add"),
}

# The engines' arithmetic for a client step trained with run-config `train-precision`
# (`shared.quant.integer_training`): float32 errors and gradients run on fp32 engines.
TRAIN_ARITHMETIC: dict[str, str] = {"float": "fp32", "fp16": "fp16", "int8": "int8"}

# Energy-related fields, their default and where the default comes from.
FIELD_SOURCES: dict[str, str] = {
    "dram_pj_per_bit": DRAM_64B.source,
    "sram_bank_kb": SRAM_RULE,
    "tech_nm": TECH_RULE,
    "target_tflops_per_w": TARGET_TFLOPS_PER_W.source,
    "core_energy_scale": "calibrated: dense fp16 reference workload reaches target_tflops_per_w",
}


def _one_line(err: ValidationError, data: dict[str, Any]) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "?"
    bad = data.get(key, first.get("input"))
    return f"chip config: {key}={bad!r} is not allowed: {first['msg']}"


class ChipConfig(BaseModel):
    """A configurable multi-core chip with FP / BP / WG engines and a vector unit per core.

    Args (all keywords; see `PRESETS` for complete sets):
        cores: cores working on a training step (they split the batch).
        lanes_fp, lanes_bp, lanes_wg: MAC/AC lanes of each core's FP, BP and WG engine.
        neuron_lanes: lanes of each core's vector unit (neuron updates, BN, pooling, optimizer).
        utilization: sustained fraction of lane peak the engines reach (0..1].
        clock_mhz: core clock.
        sram_kb: SRAM per core; `weight_sram_fraction` of it holds weights and gradient
            accumulators, the rest holds the state saved for the backward pass.
        sram_bank_kb: SRAM bank size, which sets the energy per access.
        dram_gbps, dram_pj_per_bit: off-chip bandwidth (GB/s) and energy.
        precision: "fp32", "fp16", "int8" or "int4" (see `PRECISIONS`): the arithmetic of every
            engine (FP, BP, WG) and of the vector unit.
        train_precision: the client's `train-precision` ("float", "fp16", "int8") when this chip
            accounts a real training step (`for_training`), else None (a modelled step).
        replaced_precision: the precision the chip (its preset) specified before `for_training`
            replaced it by the arithmetic the step ran; None when they agreed.
        sparsity_skip: which zeros the engines skip: "none", "input" (zero spikes/activations),
            "output" (zero errors) or "dual" (both).
        membrane: what the forward pass keeps for the surrogate gradient: "store" (potentials at
            state precision), "mask" (1 bit: inside the surrogate window; exact for a rectangle
            surrogate, an approximation otherwise) or "recompute" (nothing; the backward pass
            re-runs the forward, doubling FP work).
        optimizer: "sgd" (momentum, one state tensor) or "adam" (two).
        tech_nm: technology node; 45 nm energies are scaled linearly to it.
        core_energy_scale: multiplier on all core (non-DRAM) energy; None = calibrated when the
            chip model is built (`shared.neurocore.calibrate.resolve_energy_scale`).
        target_tflops_per_w: the calibration target.

    The value holds numbers only; validation errors are `ChipConfigError`s.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cores: int = Field(4, ge=1, le=4096)
    lanes_fp: int = Field(64, ge=1)
    lanes_bp: int = Field(64, ge=1)
    lanes_wg: int = Field(64, ge=1)
    neuron_lanes: int = Field(16, ge=1)
    utilization: float = Field(0.9, gt=0, le=1)
    clock_mhz: float = Field(500.0, gt=0)
    sram_kb: float = Field(256.0, gt=0)
    sram_bank_kb: float = Field(16.0, gt=0)
    weight_sram_fraction: float = Field(0.5, gt=0, lt=1)
    dram_gbps: float = Field(25.6, gt=0)
    dram_pj_per_bit: float = Field(DRAM_64B.value / 64, gt=0)
    precision: Literal["fp16", "int8", "int4", "fp32"] = "fp16"
    train_precision: Literal["float", "fp16", "int8"] | None = None
    replaced_precision: Literal["fp16", "int8", "int4", "fp32"] | None = None
    sparsity_skip: Literal["none", "input", "output", "dual"] = "dual"
    membrane: Literal["store", "mask", "recompute"] = "store"
    optimizer: Literal["sgd", "adam"] = "sgd"
    tech_nm: float = Field(28.0, gt=0)
    core_energy_scale: float | None = Field(None, gt=0)
    target_tflops_per_w: float = Field(TARGET_TFLOPS_PER_W.value, gt=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ChipConfigError(_one_line(err, data)) from None
        if self.sram_bank_kb > self.sram_kb:
            raise ChipConfigError(
                f"chip config: sram_bank_kb={self.sram_bank_kb} is not allowed: a bank cannot be "
                f"larger than the core's SRAM (sram_kb={self.sram_kb})"
            )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ChipConfig:
        """A named preset (`PRESETS`), with keyword overrides."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ChipConfigError(
                f"unknown chip preset {name!r}; choose one of: {', '.join(PRESETS)}"
            ) from None
        return cls(**{**base, **overrides})

    def for_training(self, train_precision: str) -> ChipConfig:
        """This chip accounting a client step trained with `train_precision` (float, fp16, int8).

        The engines' precision becomes the arithmetic the step ran (`TRAIN_ARITHMETIC`: float ->
        fp32), so no figure claims arithmetic that did not happen; where that differs from this
        config's precision, `replaced_precision` keeps the one specified and the report says so.
        """
        try:
            arithmetic = TRAIN_ARITHMETIC[train_precision]
        except KeyError:
            raise ChipConfigError(
                f"chip config: train_precision={train_precision!r} is not allowed: choose one of "
                f"{', '.join(TRAIN_ARITHMETIC)}"
            ) from None
        replaced = self.replaced_precision
        if arithmetic != self.precision:
            replaced = replaced or self.precision
        elif replaced == arithmetic:
            replaced = None
        return self.replace(precision=arithmetic, train_precision=train_precision,
                            replaced_precision=replaced)

    def precision_notes(self) -> list[str]:
        """What the report says about the arithmetic its figures describe (one line each)."""
        if self.train_precision is None:
            return [f"Engines modelled at {self.precision}; the counts come from the traced step "
                    "(computed in float32 unless the caller trained otherwise)."]
        notes = [f"FP, BP and WG costed at {self.precision}: the arithmetic of the client's step "
                 f"(train-precision={self.train_precision}; errors and weight gradients "
                 f"{'float32' if self.train_precision == 'float' else self.train_precision})."]
        if self.replaced_precision is not None:
            notes.append(
                f"The chip preset specifies {self.replaced_precision} engines, but the client "
                f"trained with train-precision={self.train_precision}: every figure here is "
                f"costed at {self.precision} instead, no {self.replaced_precision} arithmetic is "
                f"claimed (set train-precision to match the preset to train as the chip computes)."
            )
        if self.train_precision != "float":
            notes.append("The training forward's BatchNorm (batch statistics) and membrane "
                         "updates ran in float32; FP synaptic ops on integer weight codes and "
                         "spikes are exact at any precision.")
        return notes

    def replace(self, **changes: Any) -> ChipConfig:
        """A copy with `changes`. Only fields set explicitly are carried over, so a config left to
        calibration (`core_energy_scale=None`) stays so and its factor is derived for the copy."""
        data = self.model_dump(exclude_unset=True)
        return ChipConfig(**{**data, **changes})

    # -- derived quantities --------------------------------------------------------------------
    @property
    def spec(self) -> PrecisionSpec:
        return PRECISIONS[self.precision]

    @property
    def tech_factor(self) -> float:
        return self.tech_nm / 45.0

    def op_pj(self, key: str) -> float:
        """Energy of one operation from `OP_ENERGY_45NM`, scaled to `tech_nm` (pJ, uncalibrated)."""
        return OP_ENERGY_45NM[key].value * self.tech_factor

    @property
    def mac_pj(self) -> float:
        return self.op_pj(self.spec.mul) + self.op_pj(self.spec.add)

    @property
    def ac_pj(self) -> float:
        return self.op_pj(self.spec.add)

    @property
    def vector_pj(self) -> float:
        return self.op_pj(self.spec.add)

    @property
    def sram_pj_per_byte(self) -> float:
        per_64b = SRAM_64B_8KB.value * math.sqrt(self.sram_bank_kb / 8.0)
        return per_64b / 8.0 * self.tech_factor

    @property
    def dram_bytes_per_cycle(self) -> float:
        return self.dram_gbps * 1e9 / (self.clock_mhz * 1e6)

    def energy_constants(self, energy_scale: float | None = None) -> dict[str, dict[str, Any]]:
        """Every energy constant the cost model uses for this config: value, unit, source.

        `energy_scale` is the core-energy factor the chip model resolved (`NeuroCore.energy_scale`);
        without it the entry shows `core_energy_scale` as set (None: to be calibrated)."""
        spec = self.spec
        out: dict[str, dict[str, Any]] = {}
        for role, key in (("mul", spec.mul), ("add", spec.add)):
            const = OP_ENERGY_45NM[key]
            out[f"{role} ({key})"] = {
                "value": self.op_pj(key),
                "unit": f"pJ at {self.tech_nm:g} nm (45 nm: {const.value:.4g})",
                "source": f"{const.source}; {TECH_RULE}",
            }
        out["sram"] = {
            "value": self.sram_pj_per_byte,
            "unit": f"pJ/byte, {self.sram_bank_kb:g} KB bank at {self.tech_nm:g} nm",
            "source": f"{SRAM_RULE}; {TECH_RULE}",
        }
        out["dram"] = {
            "value": self.dram_pj_per_bit,
            "unit": "pJ/bit",
            "source": self._source("dram_pj_per_bit"),
        }
        out["core_energy_scale"] = {
            "value": energy_scale if energy_scale is not None else self.core_energy_scale,
            "unit": "x core energy",
            "source": self._source("core_energy_scale"),
        }
        out["a100_dram_bandwidth"] = {
            "value": A100_DRAM_GBPS.value,
            "unit": A100_DRAM_GBPS.unit,
            "source": A100_DRAM_GBPS.source,
        }
        return out

    def _source(self, field: str) -> str:
        default = type(self).model_fields[field].default
        if getattr(self, field) == default:
            return FIELD_SOURCES[field]
        return f"set in this configuration (default {default!r}: {FIELD_SOURCES[field]})"


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's scale: 20 cores, fp16, 28 nm, calibrated to 1.05 TFLOPS/W. Lane counts, clock,
    # SRAM and the single DDR4-3200 channel are illustrative choices, not the paper's figures.
    "paper-28nm-fp16": {
        "cores": 20,
        "lanes_fp": 64,
        "lanes_bp": 64,
        "lanes_wg": 64,
        "neuron_lanes": 16,
        "clock_mhz": 500.0,
        "sram_kb": 256.0,
        "sram_bank_kb": 16.0,
        "dram_gbps": 25.6,
        "precision": "fp16",
        "sparsity_skip": "dual",
        "membrane": "store",
        "tech_nm": 28.0,
    },
    # A small edge part: 4 cores, int8 weights (int16 state), one LPDDR4 x32 channel.
    "edge-int8": {
        "cores": 4,
        "lanes_fp": 32,
        "lanes_bp": 32,
        "lanes_wg": 32,
        "neuron_lanes": 8,
        "clock_mhz": 200.0,
        "sram_kb": 128.0,
        "sram_bank_kb": 8.0,
        "dram_gbps": 12.8,
        "precision": "int8",
        "sparsity_skip": "dual",
        "membrane": "store",
        "tech_nm": 28.0,
    },
}
