"""The fleet as it is: each client a device with its own chip, link, energy and availability.

A fleet file (`--fleet FILE.toml`, examples in `deploy/fleets/`) declares device classes; every
class has `count` identical devices, named `<class>-<i>`:

    name = "edge-mix"
    [classes.phone]
    count = 20
    chip = { preset = "edge-int8", cores = 4, clock_mhz = 400 }   # or chip = "edge-int8"
    uplink_mbps = 5.0        # link: bandwidth each way (megabits per second) and one-way latency
    downlink_mbps = 20.0
    latency_ms = 40.0
    radio = "lte"            # radio energy per bit and base power (RADIOS)
    budget_j = 2.0           # most joules a round may cost the device (optional)
    battery_j = 20.0         # battery capacity (optional), full at start ...
    recharge_j = 0.5         # ... and recharged by this much at the start of every round
    availability = 0.8       # share of rounds the device is online

A device-profile file (`spikefed-client --device-profile FILE.toml`) holds one class's fields
without `count`.

The model of one round on device d (all times simulated seconds, energies joules):

    compute_s  = cycles / clock                        (the chip model's cycles of the round's
                                                        local training, shared.neurocore)
    transfer_s = 2 * latency + 8 * bytes_down / downlink + 8 * bytes_up / uplink
    seconds    = compute_s + transfer_s
    radio_j    = 8 * bytes_up * e_up + 8 * bytes_down * e_down + p_base * transfer_s
    energy_j   = chip_j + radio_j                      (chip_j: the chip model's joules)

A round has a deadline D (`round-deadline-s`; 0 = none). A device that would exceed the energy it
has this round (min of `budget_j` and its battery's charge) runs out of energy: it spends what it
had and its reply is dropped (`out_of_energy`). A device that would finish after D is a straggler:
it spends its energy, and its late reply is dropped (`stragglers`). The round lasts the slowest
accepted device's time; when a selected device was dropped the server, which cannot know that a
reply will never come, waits for the deadline (with no deadline: the slowest device's time).
Online devices are drawn each round from `availability` with the run's seed.

Selection (`selection` = uniform | aware), both among the devices online this round and with the
same number of devices a round as Flower's sampling (`fraction-train`):

- uniform: a uniform sample (Flower's rule).
- aware: the devices *expected* to finish within the deadline and their energy (the estimate:
  the chip model's cost of one local step on the device's chip x its local steps, corrected by
  the device's last reply, or else its class's latest reply), taken oldest-first: the device
  not selected for the longest time goes first (ties: the faster first). That is the fairness
  rule: among feasible devices selection is round-robin, so none waits more than
  ceil(feasible / k) rounds; a device infeasible now (an empty battery) is first in line once it
  has recharged. A class no reply has corrected yet counts as feasible within `FILL_SLACK`
  (1.25x) of its limits (the first step's estimate, from the initial model, is pessimistic:
  trained models spike less), so a pessimistic estimate cannot starve a class; its first replies
  then decide. When fewer than k devices are feasible, the round is filled with those expected
  within `FILL_SLACK` of their deadline and energy, closest first; devices farther off are not
  asked (they would only be dropped, spending energy and holding the round to its deadline).

This module is pure (no flwr): profiles, parsing, the cost model, the fleet's state and selection.
The Flower-facing parts are `server.fleet` (strategy hooks) and `client.app` (device figures).
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import UserError
from shared.neurocore.config import PRESETS, ChipConfig, ChipConfigError

HUANG_2012 = ("Huang et al., 'A Close Examination of Performance and Power Characteristics of 4G "
              "LTE Networks', ACM MobiSys 2012: measured power models P = a_u*r_u + a_d*r_d + "
              "beta (a in mW per Mbit/s, beta in mW)")


@dataclass(frozen=True)
class Radio:
    """Energy of a radio: joules per bit sent (up) and received (down), and the base power (W)
    drawn while the link is active (latency and transfer)."""

    up_j_per_bit: float
    down_j_per_bit: float
    base_w: float
    source: str = HUANG_2012


# a in mW per Mbit/s is nJ per bit: 438.39 mW/(Mbit/s) = 438.39e-9 J/bit. Tail energy (the radio
# staying powered after a transfer, ~11 s for LTE in the same paper) is not modelled.
RADIOS: dict[str, Radio] = {
    "lte": Radio(438.39e-9, 51.97e-9, 1.28804),
    "wifi": Radio(283.17e-9, 137.01e-9, 0.13286),
    "3g": Radio(868.98e-9, 122.12e-9, 0.81788),
}

MAX_DEVICES = 100_000
CLASS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"


class FleetError(UserError, ValueError):
    """A missing or bad fleet / device-profile file: one line, exit code 2."""


def _chip(value: object) -> ChipConfig:
    """A chip preset name, or a table of ChipConfig fields (with an optional `preset` to start
    from)."""
    if isinstance(value, ChipConfig):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown chip preset {value!r}; choose one of {', '.join(PRESETS)} "
                             "or give a table of chip fields")
        return ChipConfig.preset(value)
    if isinstance(value, Mapping):
        fields = dict(value)
        preset = fields.pop("preset", None)
        try:
            if preset is None:
                return ChipConfig(**fields)
            if not isinstance(preset, str):
                raise ValueError(f"preset must be a name, got {preset!r}")
            return ChipConfig.preset(preset, **fields)
        except ChipConfigError as err:
            raise ValueError(str(err).removeprefix("chip config: ")) from None
        except TypeError as err:  # keys that are not identifiers
            raise ValueError(f"bad chip fields: {err}") from None
    raise ValueError("chip must be a preset name or a table of chip fields")


class DeviceProfile(BaseModel):
    """One device: its training chip, its link, its energy and its availability."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              arbitrary_types_allowed=True)

    chip: ChipConfig = Field(default_factory=lambda: ChipConfig.preset("edge-int8"))
    uplink_mbps: float = Field(gt=0, le=1e6, description="uplink bandwidth, Mbit/s")
    downlink_mbps: float = Field(gt=0, le=1e6, description="downlink bandwidth, Mbit/s")
    latency_ms: float = Field(0.0, ge=0, le=1e7, description="one-way latency per transfer")
    radio: Literal["lte", "wifi", "3g"] = "wifi"
    budget_j: float | None = Field(None, gt=0, le=1e12, description="joules a round may cost")
    battery_j: float | None = Field(None, gt=0, le=1e12, description="battery capacity, J")
    recharge_j: float = Field(0.0, ge=0, le=1e12, description="J recharged every round")
    availability: float = Field(1.0, gt=0, le=1, description="share of rounds online")

    @field_validator("chip", mode="before")
    @classmethod
    def _parse_chip(cls, value: object) -> ChipConfig:
        return _chip(value)

    def to_json(self) -> dict[str, Any]:
        """Plain values (the chip as its fields), which `DeviceProfile.model_validate` reads."""
        data = self.model_dump(exclude={"chip"})
        return {"chip": self.chip.model_dump(exclude_none=True), **data}


class DeviceClass(DeviceProfile):
    count: int = Field(ge=1, le=MAX_DEVICES, description="devices of this class")

    def profile(self) -> DeviceProfile:
        return DeviceProfile.model_validate(self.model_dump(exclude={"count"}))


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("fleet", min_length=1, max_length=100)
    description: str = Field("", max_length=10_000)
    classes: dict[str, DeviceClass] = Field(min_length=1)

    @field_validator("classes")
    @classmethod
    def _names(cls, classes: dict[str, DeviceClass]) -> dict[str, DeviceClass]:
        import re

        for name in classes:
            if not re.fullmatch(CLASS_NAME, name):
                raise ValueError(f"class name {name!r}: use 1-40 letters, digits, '-', '_', '.'")
        total = sum(c.count for c in classes.values())
        if total > MAX_DEVICES:
            raise ValueError(f"{total} devices; at most {MAX_DEVICES}")
        return classes


@dataclass(frozen=True)
class Device:
    index: int  # 0.. in the fleet's order (classes in file order)
    name: str  # <class>-<i>
    klass: str
    profile: DeviceProfile


@dataclass(frozen=True)
class Fleet:
    """A parsed fleet: its devices in file order."""

    name: str
    description: str
    classes: dict[str, DeviceClass]
    devices: tuple[Device, ...]
    path: str = ""

    @classmethod
    def from_spec(cls, spec: FleetSpec, path: str = "") -> Fleet:
        devices = []
        for klass, entry in spec.classes.items():
            profile = entry.profile()
            width = len(str(entry.count - 1))
            for i in range(entry.count):
                devices.append(Device(len(devices), f"{klass}-{i:0{width}d}", klass, profile))
        return cls(spec.name, spec.description, dict(spec.classes), tuple(devices), path)

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, name: str) -> Device:
        """A device by name (`phone-03`), or the first device of a class (`phone`)."""
        for device in self.devices:
            if device.name == name:
                return device
        for device in self.devices:
            if device.klass == name:
                return device
        raise FleetError(f"fleet {self.path or self.name} has no device or class {name!r} "
                         f"(classes: {', '.join(self.classes)})")

    def counts(self) -> dict[str, int]:
        return {name: entry.count for name, entry in self.classes.items()}


def _one_line(err: ValidationError, what: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "missing":
        return f"{what}: {where} is missing"
    message = str(first["msg"]).removeprefix("Value error, ")
    shown = repr(first.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    text = f"{what}: {where}={shown} is not allowed: {message}"
    return " ".join(text.split())  # one line, whatever the value held


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FleetError(f"{what} {path}: no such file (example fleets: deploy/fleets/)") from None
    except IsADirectoryError:
        raise FleetError(f"{what} {path} is a directory; give a .toml file") from None
    except OSError as err:
        raise FleetError(f"{what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise FleetError(f"{what} {path} is not UTF-8 text (a TOML file)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FleetError(" ".join(f"{what} {path} is not valid TOML: {err}".split())) from None
    except RecursionError:
        raise FleetError(f"{what} {path}: TOML nested too deeply") from None


def parse_fleet(data: Mapping[str, Any], path: str = "") -> Fleet:
    """A `Fleet` from a fleet file's TOML table; `FleetError` (one line) when it is not one."""
    what = f"fleet {path}" if path else "fleet"
    try:
        spec = FleetSpec.model_validate(dict(data))
    except ValidationError as err:
        raise FleetError(_one_line(err, what)) from None
    except (RecursionError, TypeError, ValueError, OverflowError) as err:
        raise FleetError(" ".join(f"{what}: {err}".split())) from None
    return Fleet.from_spec(spec, path)


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet file."""
    return parse_fleet(_read_toml(path, "fleet"), str(path))


def load_profile(path: str | Path, device: str | None = None) -> tuple[str, DeviceProfile]:
    """(class name, profile) from a device-profile file, or from a fleet file and a device (or
    class) name in it."""
    data = _read_toml(path, "device profile")
    if "classes" in data:
        if not device:
            raise FleetError(f"{path} is a fleet file: name the device too (--device NAME)")
        found = parse_fleet(data, str(path)).device(device)
        return found.klass, found.profile
    if device:
        raise FleetError(f"--device {device}: {path} is a single device profile, not a fleet")
    data = {k: v for k, v in data.items() if k not in ("name", "count")}
    try:
        return "device", DeviceProfile.model_validate(data)
    except ValidationError as err:
        raise FleetError(_one_line(err, f"device profile {path}")) from None
    except (RecursionError, TypeError, ValueError, OverflowError) as err:
        raise FleetError(" ".join(f"device profile {path}: {err}".split())) from None


# -- the cost model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceCost:
    """One device's round: simulated seconds and joules, split by chip and link."""

    compute_s: float
    transfer_s: float
    chip_j: float
    radio_j: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.transfer_s

    @property
    def energy_j(self) -> float:
        return self.chip_j + self.radio_j


def transfer_seconds(profile: DeviceProfile, bytes_down: float, bytes_up: float) -> float:
    """Latency each way plus the bytes at the link's bandwidth, seconds."""
    return (2 * profile.latency_ms / 1e3 + 8 * bytes_down / (profile.downlink_mbps * 1e6)
            + 8 * bytes_up / (profile.uplink_mbps * 1e6))


def device_cost(profile: DeviceProfile, *, cycles: float, chip_j: float, bytes_down: float,
                bytes_up: float) -> DeviceCost:
    """The device's round from the chip model's `cycles` and `chip_j` and the bytes it received
    and sent (see the module docstring for the formulas)."""
    radio = RADIOS[profile.radio]
    transfer = transfer_seconds(profile, bytes_down, bytes_up)
    radio_j = (8 * bytes_up * radio.up_j_per_bit + 8 * bytes_down * radio.down_j_per_bit
               + radio.base_w * transfer)
    return DeviceCost(cycles / (profile.chip.clock_mhz * 1e6), transfer, chip_j, radio_j)


def local_steps(examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a round's local training (client.train skips a last batch of one)."""
    if examples <= 0 or (batch_size == 1 and examples > 1):
        return 0
    full, rest = divmod(examples, batch_size)
    per_epoch = full + (1 if rest > 1 or (rest == 1 and examples == 1) else 0)
    return epochs * per_epoch


@dataclass(frozen=True)
class StepCost:
    """The chip model's cost of one local training step (a batch of `batch-size`)."""

    cycles: float
    chip_j: float


def train_precision_for(chip: ChipConfig, run_precision: str) -> str:
    """The arithmetic a device trains in: the run's `train-precision`, or with `auto` its chip's
    own precision (fp32 -> float, fp16 -> fp16, int8 / int4 -> int8)."""
    if run_precision != "auto":
        return run_precision
    return {"fp32": "float", "fp16": "fp16"}.get(chip.precision, "int8")


def step_costs(profiles: Mapping[str, DeviceProfile], model: Any, x: Any, y: Any, *,
               optimizer: str, train_precision: str) -> dict[str, StepCost]:
    """The chip model's cost of one training step of `model` on the batch (x, y) (model layout)
    on each profile's chip, by class name: the selection's estimate before a device has replied."""
    from shared.neurocore import NeuroCore

    costs = {}
    for name, profile in profiles.items():
        chip = profile.chip.replace(optimizer=optimizer)
        chip = chip.for_training(train_precision_for(chip, train_precision))
        report = NeuroCore(chip).profile(model, x, y)
        costs[name] = StepCost(float(report.cycles), float(report.energy_j))
    return costs


# -- the fleet's state: batteries, availability, estimates, selection ---------------------------
OUTCOMES = ("accepted", "straggler", "out-of-energy")
# aware selection fills a round short of feasible devices only with devices expected within this
# factor of their limits (the estimate may be pessimistic); farther ones would only be dropped
FILL_SLACK = 1.25


@dataclass
class DeviceState:
    charge_j: float | None  # battery charge (None: no battery)
    last_selected: int = 0  # round (0: never)
    selected: int = 0
    contributed: int = 0  # replies accepted (in time, within energy)
    stragglers: int = 0
    out_of_energy: int = 0
    energy_j: float = 0.0  # spent in all rounds
    examples: int | None = None  # from its replies
    step: StepCost | None = None  # per local step, from its last reply

    def to_json(self) -> dict[str, Any]:
        return {k: (v.__dict__ if isinstance(v, StepCost) else v)
                for k, v in self.__dict__.items()}


@dataclass
class RoundOutcome:
    """What the fleet did in one round."""

    online: int = 0
    selected: int = 0
    accepted: int = 0
    stragglers: int = 0
    out_of_energy: int = 0
    sim_seconds: float = 0.0
    energy_j: float = 0.0  # spent by every selected device that trained (dropped ones too)
    energy_by_class: dict[str, float] = field(default_factory=dict)
    devices: list[tuple[str, str, float, float]] = field(default_factory=list)  # name, outcome,
    #                                                                              seconds, joules


class FleetState:
    """Batteries, availability draws, cost estimates and the selection policy of a fleet.

    `examples_default` is the partition size assumed before a device has replied;
    `step_defaults` the per-step chip cost per class (`step_costs`)."""

    def __init__(self, fleet: Fleet, *, seed: int = 0, deadline_s: float = 0.0,
                 policy: str = "uniform", batch_size: int = 32, epochs: int = 1,
                 examples_default: int = 1, step_defaults: Mapping[str, StepCost] | None = None
                 ) -> None:
        if policy not in ("uniform", "aware"):
            raise ValueError(f"unknown selection policy {policy!r}")
        self.fleet, self.seed, self.deadline_s, self.policy = fleet, seed, deadline_s, policy
        self.batch_size, self.epochs = batch_size, epochs
        self.examples_default = max(1, examples_default)
        self.step_defaults = dict(step_defaults or {})
        self.state = [DeviceState(d.profile.battery_j) for d in fleet.devices]
        self.class_step: dict[str, StepCost] = {}  # per step, from a class's latest reply
        self.rounds: dict[int, RoundOutcome] = {}

    # -- round start ---------------------------------------------------------------------------
    def recharge(self) -> None:
        """Every device's battery gains its `recharge_j`, up to its capacity."""
        for device, state in zip(self.fleet.devices, self.state, strict=True):
            cap = device.profile.battery_j
            if cap is not None and state.charge_j is not None:
                state.charge_j = min(cap, state.charge_j + device.profile.recharge_j)

    def online(self, round_: int, indices: Iterable[int] | None = None) -> list[int]:
        """The devices (among `indices`, default all) online in `round_`: a draw per device and
        round from the run's seed, so a rerun sees the same fleet."""
        draws = random.Random(f"{self.seed}:{round_}:availability")
        values = [draws.random() for _ in self.fleet.devices]
        pool = range(len(self.fleet)) if indices is None else indices
        return [i for i in pool if values[i] < self.fleet.devices[i].profile.availability]

    def available_j(self, index: int) -> float:
        """Joules device `index` may spend this round: min(budget, battery charge)."""
        profile, state = self.fleet.devices[index].profile, self.state[index]
        limits = [v for v in (profile.budget_j, state.charge_j) if v is not None]
        return min(limits) if limits else math.inf

    # -- estimates -----------------------------------------------------------------------------
    def expected(self, index: int, bytes_down: float, bytes_up: float) -> DeviceCost | None:
        """Expected cost of device `index`'s next round (None with no step estimate)."""
        device, state = self.fleet.devices[index], self.state[index]
        step = state.step or self.class_step.get(device.klass) or self.step_defaults.get(
            device.klass)
        if step is None:
            return None
        steps = local_steps(state.examples or self.examples_default, self.batch_size, self.epochs)
        return device_cost(device.profile, cycles=step.cycles * steps,
                           chip_j=step.chip_j * steps, bytes_down=bytes_down, bytes_up=bytes_up)

    def untried(self, index: int) -> bool:
        """No device of this one's class has replied yet: its estimate is the profile's."""
        return self.fleet.devices[index].klass not in self.class_step

    def shortfall(self, index: int, cost: DeviceCost | None) -> float:
        """max(expected seconds / deadline, expected joules / available joules): <= 1 is
        feasible; 0 when nothing is known."""
        if cost is None:
            return 0.0
        ratio = 0.0
        if self.deadline_s > 0:
            ratio = cost.seconds / self.deadline_s
        available = self.available_j(index)
        if math.isfinite(available):
            ratio = max(ratio, cost.energy_j / available if available > 0 else math.inf)
        return ratio

    # -- selection -----------------------------------------------------------------------------
    def select(self, round_: int, candidates: Sequence[int], k: int, *, bytes_down: float,
               bytes_up: float, rng: random.Random | None = None) -> list[int]:
        """`k` devices (fewer when fewer are online) among `candidates` by the policy."""
        k = min(k, len(candidates))
        if self.policy == "uniform":
            rng = rng or random.Random(f"{self.seed}:{round_}:uniform")
            return sorted(rng.sample(list(candidates), k))
        ranked = []
        for i in candidates:
            cost = self.expected(i, bytes_down, bytes_up)
            age = round_ - self.state[i].last_selected
            seconds = cost.seconds if cost is not None else 0.0
            ratio = self.shortfall(i, cost)
            feasible = ratio <= 1.0 or (self.untried(i) and ratio <= FILL_SLACK)
            ranked.append((not feasible, -age, seconds, i))
        feasible = sorted(r for r in ranked if not r[0])
        near = sorted((ratio, r[3]) for r in ranked if r[0]
                      if (ratio := self.shortfall(r[3], self.expected(r[3], bytes_down,
                                                                      bytes_up))) <= FILL_SLACK)
        chosen = [r[3] for r in feasible[:k]] + [i for _, i in near[: max(0, k - len(feasible))]]
        return sorted(chosen)

    def mark_selected(self, round_: int, indices: Iterable[int]) -> None:
        for i in indices:
            self.state[i].last_selected = round_
            self.state[i].selected += 1

    # -- settling a reply ----------------------------------------------------------------------
    def settle(self, index: int, cost: DeviceCost, *, examples: int | None = None,
               steps: int | None = None) -> tuple[str, float]:
        """Decide a reply: (outcome, joules spent). Out of energy (the device stops when its
        energy is gone) before straggler (the reply would come after the deadline); both are
        dropped. Updates the battery, the counters and the device's cost estimate."""
        state = self.state[index]
        if examples:
            state.examples = int(examples)
        if steps:
            device = self.fleet.devices[index]
            clock = device.profile.chip.clock_mhz * 1e6
            state.step = StepCost(cost.compute_s * clock / steps, cost.chip_j / steps)
            self.class_step[device.klass] = state.step
        available = self.available_j(index)
        if cost.energy_j > available:
            outcome, spent = "out-of-energy", available
            state.out_of_energy += 1
        elif self.deadline_s > 0 and cost.seconds > self.deadline_s:
            outcome, spent = "straggler", cost.energy_j
            state.stragglers += 1
        else:
            outcome, spent = "accepted", cost.energy_j
            state.contributed += 1
        if state.charge_j is not None:
            state.charge_j = max(0.0, state.charge_j - spent)
        state.energy_j += spent
        return outcome, spent

    def close_round(self, round_: int, outcome: RoundOutcome) -> RoundOutcome:
        """The round's simulated time: the slowest accepted device's, or the deadline when a
        selected device's reply never came in time (with no deadline: the slowest device's)."""
        accepted = [s for _, o, s, _ in outcome.devices if o == "accepted"]
        everyone = [s for _, _, s, _ in outcome.devices]
        dropped = outcome.selected - outcome.accepted
        if dropped > 0:
            outcome.sim_seconds = self.deadline_s if self.deadline_s > 0 else max(everyone,
                                                                                  default=0.0)
        else:
            outcome.sim_seconds = max(accepted, default=0.0)
        self.rounds[round_] = outcome
        return outcome

    # -- what the run reports ------------------------------------------------------------------
    def contributed_share(self) -> float:
        """Share of the fleet's devices whose reply was accepted at least once."""
        return sum(s.contributed > 0 for s in self.state) / len(self.state)

    def summary(self) -> dict[str, Any]:
        by_class: dict[str, dict[str, Any]] = {}
        for device, state in zip(self.fleet.devices, self.state, strict=True):
            entry = by_class.setdefault(device.klass, {
                "devices": 0, "selected": 0, "contributed": 0, "devices_contributed": 0,
                "stragglers": 0, "out_of_energy": 0, "energy_j": 0.0})
            entry["devices"] += 1
            entry["selected"] += state.selected
            entry["contributed"] += state.contributed
            entry["devices_contributed"] += state.contributed > 0
            entry["stragglers"] += state.stragglers
            entry["out_of_energy"] += state.out_of_energy
            entry["energy_j"] += state.energy_j
        selected = [s.selected for s in self.state]
        return {
            "name": self.fleet.name,
            "file": self.fleet.path,
            "devices": len(self.fleet),
            "selection": self.policy,
            "round_deadline_s": self.deadline_s,
            "contributed_share": self.contributed_share(),
            "selected_share": sum(n > 0 for n in selected) / len(selected),
            "classes": by_class,
        }

    def to_json(self) -> dict[str, Any]:
        """Per-device state by name (fleet.json; read back by `restore` on resume)."""
        return {d.name: s.to_json() for d, s in zip(self.fleet.devices, self.state, strict=True)}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Continue from `to_json`'s output (a resumed run); unknown names are ignored."""
        for device, state in zip(self.fleet.devices, self.state, strict=True):
            saved = data.get(device.name)
            if not isinstance(saved, Mapping):
                continue
            for key in ("last_selected", "selected", "contributed", "stragglers",
                        "out_of_energy", "examples"):
                if isinstance(saved.get(key), int) and not isinstance(saved.get(key), bool):
                    setattr(state, key, saved[key])
            for key in ("charge_j", "energy_j"):
                value = saved.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and math.isfinite(value) and value >= 0:
                    setattr(state, key, float(value))
            step = saved.get("step")
            if isinstance(step, Mapping):
                try:
                    state.step = StepCost(float(step["cycles"]), float(step["chip_j"]))
                except (KeyError, TypeError, ValueError):
                    pass


ACCURACY_TARGETS = (0.8, 0.9, 0.95)  # summary.json's time_to_accuracy / energy_to_accuracy


def to_accuracy(history: Sequence[Mapping[str, Any]], key: str,
                targets: Sequence[float] = ACCURACY_TARGETS) -> dict[str, float | None]:
    """Cumulative `key` (sim_seconds, sim_energy_j) over the rounds until the global accuracy
    first reaches each target, as {"0.9": value or None (never reached)}. None for every target
    when the history has no such figures (a run without a fleet)."""
    out: dict[str, float | None] = {f"{t:g}": None for t in targets}
    total, seen = 0.0, False
    for entry in history:
        value = entry.get(key)
        if value is None:
            continue
        seen = True
        total += float(value)
        for t in targets:
            if out[f"{t:g}"] is None and float(entry.get("accuracy", 0.0)) >= t:
                out[f"{t:g}"] = total
    return out if seen else {f"{t:g}": None for t in targets}
