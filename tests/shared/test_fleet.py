"""shared.fleet: fleet files, the time and energy model, batteries, availability and selection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import RunConfig
from shared.errors import ConfigError, UserError
from shared.fleet import (
    RADIOS,
    DeviceCost,
    DeviceProfile,
    FleetError,
    FleetState,
    RoundOutcome,
    StepCost,
    device_cost,
    load_fleet,
    load_profile,
    local_steps,
    parse_fleet,
    to_accuracy,
    train_precision_for,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "fleets" / "edge-mix.toml"

SMALL = """
name = "small"
[classes.fast]
count = 3
chip = "edge-int8"
uplink_mbps = 10.0
downlink_mbps = 10.0
[classes.slow]
count = 2
chip = { preset = "edge-int8", cores = 1, clock_mhz = 1.0 }
uplink_mbps = 0.01
downlink_mbps = 0.01
latency_ms = 100.0
radio = "wifi"
battery_j = 5.0
recharge_j = 1.0
availability = 0.5
"""


def small_fleet(tmp_path: Path, text: str = SMALL):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return load_fleet(path)


def test_the_shipped_fleet_is_heterogeneous_with_at_least_50_devices():
    fleet = load_fleet(SHIPPED)
    assert len(fleet) >= 50 and len(fleet.classes) >= 4
    chips = {(d.profile.chip.cores, d.profile.chip.clock_mhz, d.profile.chip.precision)
             for d in fleet.devices}
    links = {(d.profile.uplink_mbps, d.profile.downlink_mbps) for d in fleet.devices}
    assert len(chips) >= 4 and len(links) >= 4
    assert any(d.profile.battery_j for d in fleet.devices)
    assert any(d.profile.budget_j for d in fleet.devices)
    assert any(d.profile.availability < 1 for d in fleet.devices)
    assert len({d.name for d in fleet.devices}) == len(fleet)  # unique names


def test_the_shipped_device_profile_loads():
    klass, profile = load_profile(SHIPPED.parent / "device-watch.toml")
    assert klass == "device" and profile.chip.cores == 2 and profile.battery_j == 5.0


def test_classes_expand_to_named_devices_with_their_chip(tmp_path):
    fleet = small_fleet(tmp_path)
    assert [d.name for d in fleet.devices] == ["fast-0", "fast-1", "fast-2", "slow-0", "slow-1"]
    assert fleet.counts() == {"fast": 3, "slow": 2}
    slow = fleet.device("slow-1").profile
    assert slow.chip.cores == 1 and slow.chip.clock_mhz == 1.0 and slow.chip.precision == "int8"
    assert fleet.device("slow").name == "slow-0"  # a class name: its first device
    with pytest.raises(FleetError, match="no device or class 'tablet'"):
        fleet.device("tablet")


def test_the_profile_travels_as_json_and_back(tmp_path):
    profile = small_fleet(tmp_path).device("slow-0").profile
    assert DeviceProfile.model_validate(profile.to_json()) == profile


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name = 'x'", "classes"),
        ("[classes.a]\ncount = 0\nuplink_mbps = 1.0\ndownlink_mbps = 1.0", "classes.a.count=0"),
        ("[classes.a]\ncount = 1\nuplink_mbps = -1.0\ndownlink_mbps = 1.0", "uplink_mbps=-1.0"),
        ("[classes.a]\ncount = 1\ndownlink_mbps = 1.0", "uplink_mbps"),
        ("[classes.a]\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\nchip = 'tpu'",
         "unknown chip preset 'tpu'"),
        ("[classes.a]\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\n"
         "chip = { cores = 0 }", "cores=0"),
        ("[classes.a]\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\navailability = 1.5",
         "availability=1.5"),
        ("[classes.a]\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\nradio = 'ble'",
         "radio='ble'"),
        ("[classes.a]\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0\nspeed = 3",
         "speed=3"),
        ("[classes.'a b']\ncount = 1\nuplink_mbps = 1.0\ndownlink_mbps = 1.0", "class name"),
        ("[classes.a]\ncount = 1\nuplink_mbps = nan\ndownlink_mbps = 1.0", "uplink_mbps=nan"),
        ("[classes.a\ncount = 1", "not valid TOML"),
    ],
)
def test_a_bad_fleet_file_is_one_line_naming_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FleetError) as err:
        load_fleet(path)
    message = str(err.value)
    assert needle in message and "\n" not in message and str(path) in message
    assert err.value.exit_code == 2


def test_a_missing_or_unreadable_fleet_file_is_one_line(tmp_path):
    with pytest.raises(FleetError, match="no such file"):
        load_fleet(tmp_path / "missing.toml")
    with pytest.raises(FleetError, match="is a directory"):
        load_fleet(tmp_path)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FleetError, match="not UTF-8"):
        load_fleet(tmp_path / "binary.toml")


TOML_SCALARS = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30), st.floats(allow_nan=True),
    st.booleans(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
)
FIELDS = ("count", "chip", "uplink_mbps", "downlink_mbps", "latency_ms", "radio", "budget_j",
          "battery_j", "recharge_j", "availability", "cores", "preset", "bogus")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(value), repr(value))
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_garbage_text_is_a_one_line_error_never_a_traceback(text):
    try:
        load_fleet_text(text)
    except FleetError as err:
        assert "\n" not in str(err)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), TOML_SCALARS, max_size=8),
       st.dictionaries(st.sampled_from(FIELDS), TOML_SCALARS, max_size=4))
def test_garbage_values_are_a_one_line_error_never_a_traceback(entry, chip):
    lines = ["[classes.c]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    if chip:
        lines.append("[classes.c.chip]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in chip.items()]
    text = "\n".join(lines)
    try:
        fleet = load_fleet_text(text)
    except FleetError as err:
        assert "\n" not in str(err)
    else:  # a valid fleet: every device is usable by the cost model
        device = fleet.devices[0]
        cost = device_cost(device.profile, cycles=1e6, chip_j=1e-3, bytes_down=1e4, bytes_up=1e3)
        assert math.isfinite(cost.seconds) and math.isfinite(cost.energy_j)


def load_fleet_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_fleet(f.name)
    finally:
        Path(f.name).unlink()


def test_device_profiles_from_a_profile_file_or_a_fleet_and_a_name(tmp_path):
    single = tmp_path / "watch.toml"
    single.write_text("chip = { preset = 'edge-int8', cores = 2 }\nuplink_mbps = 1.0\n"
                      "downlink_mbps = 4.0\nradio = 'lte'\n")
    klass, profile = load_profile(single)
    assert klass == "device" and profile.chip.cores == 2 and profile.radio == "lte"
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL)
    klass, profile = load_profile(fleet, "slow-1")
    assert klass == "slow" and profile.chip.clock_mhz == 1.0
    with pytest.raises(FleetError, match="name the device"):
        load_profile(fleet)
    with pytest.raises(FleetError, match="single device profile"):
        load_profile(single, "phone-3")
    single.write_text("uplink_mbps = 'fast'\ndownlink_mbps = 1.0\n")
    with pytest.raises(FleetError, match="uplink_mbps='fast'"):
        load_profile(single)


def test_time_is_compute_at_the_clock_plus_the_bytes_at_the_link():
    profile = DeviceProfile(chip={"preset": "edge-int8", "clock_mhz": 100.0}, uplink_mbps=1.0,
                            downlink_mbps=8.0, latency_ms=50.0, radio="wifi")
    cost = device_cost(profile, cycles=2e8, chip_j=0.5, bytes_down=1_000_000, bytes_up=125_000)
    assert cost.compute_s == pytest.approx(2.0)  # 2e8 cycles at 100 MHz
    assert cost.transfer_s == pytest.approx(0.1 + 1.0 + 1.0)  # 2 x 50 ms + 8 Mbit / 8 + 1 / 1
    radio = RADIOS["wifi"]
    expected_radio = (1e6 * radio.up_j_per_bit + 8e6 * radio.down_j_per_bit
                      + radio.base_w * cost.transfer_s)
    assert cost.radio_j == pytest.approx(expected_radio)
    assert cost.energy_j == pytest.approx(0.5 + expected_radio)
    assert cost.seconds == pytest.approx(4.1)
    assert "MobiSys 2012" in radio.source


@pytest.mark.parametrize(("examples", "batch", "epochs", "steps"),
                         [(0, 32, 3, 0), (1, 32, 3, 3), (32, 32, 2, 2), (33, 32, 2, 2),
                          (34, 32, 2, 4), (100, 32, 1, 4), (5, 1, 1, 0)])
def test_local_steps_count_what_the_trainer_runs(examples, batch, epochs, steps):
    assert local_steps(examples, batch, epochs) == steps


def test_local_steps_match_the_trainer():
    import torch
    from torch.utils.data import TensorDataset

    from client.train import train_local
    from shared.snn import build_model

    model = build_model("mlp", in_channels=1, num_classes=10, input_size=8, time_steps=1)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    data = TensorDataset(torch.rand(33, 1, 8, 8), torch.randint(0, 10, (33,)))
    train_local(model, data, epochs=2, batch_size=16, optimizer="sgd", lr=0.01, seed=0)
    assert len(calls) == local_steps(33, 16, 2) == 4  # the batch of one is skipped


def test_a_device_trains_in_its_chips_arithmetic_unless_the_run_says():
    fleet = load_fleet(SHIPPED)
    gateway, phone = fleet.device("gateway").profile.chip, fleet.device("phone").profile.chip
    assert train_precision_for(gateway, "auto") == "fp16"
    assert train_precision_for(phone, "auto") == "int8"
    assert train_precision_for(phone, "float") == "float"


def fleet_state(tmp_path, **kwargs) -> FleetState:
    defaults = {"batch_size": 32, "epochs": 1, "examples_default": 32,
                "step_defaults": {"fast": StepCost(1e5, 1e-4), "slow": StepCost(1e5, 1e-4)}}
    return FleetState(small_fleet(tmp_path), **{**defaults, **kwargs})


def test_batteries_recharge_up_to_capacity_and_drain_by_what_a_round_spent(tmp_path):
    state = fleet_state(tmp_path)
    slow = 3  # slow-0
    assert state.state[slow].charge_j == 5.0 and state.available_j(slow) == 5.0
    assert state.available_j(0) == math.inf  # no battery, no budget
    outcome, spent = state.settle(slow, DeviceCost(1.0, 1.0, 0.5, 1.5))
    assert outcome == "accepted" and spent == 2.0 and state.state[slow].charge_j == 3.0
    outcome, spent = state.settle(slow, DeviceCost(1.0, 1.0, 1.0, 4.0))
    assert outcome == "out-of-energy" and spent == 3.0 and state.state[slow].charge_j == 0.0
    state.recharge()
    assert state.state[slow].charge_j == 1.0
    for _ in range(10):
        state.recharge()
    assert state.state[slow].charge_j == 5.0  # capped at the capacity


def test_a_round_budget_caps_a_device_without_a_battery():
    from shared.fleet import Fleet, FleetSpec

    spec = FleetSpec.model_validate({"classes": {"p": {"count": 1, "uplink_mbps": 1.0,
                                                       "downlink_mbps": 1.0, "budget_j": 1.0}}})
    state = FleetState(Fleet.from_spec(spec))
    assert state.settle(0, DeviceCost(0.1, 0.1, 0.2, 0.7))[0] == "accepted"
    assert state.settle(0, DeviceCost(0.1, 0.1, 0.2, 0.9)) == ("out-of-energy", 1.0)


def test_a_late_reply_is_a_straggler_and_the_round_waits_for_the_deadline(tmp_path):
    state = fleet_state(tmp_path, deadline_s=2.0)
    outcome = RoundOutcome(selected=2)
    for index, seconds in ((0, 1.5), (1, 2.5)):
        cost = DeviceCost(seconds / 2, seconds / 2, 0.1, 0.1)
        verdict, spent = state.settle(index, cost)
        outcome.devices.append((state.fleet.devices[index].name, verdict, seconds, spent))
        outcome.accepted += verdict == "accepted"
    assert [v for _, v, _, _ in outcome.devices] == ["accepted", "straggler"]
    assert state.close_round(1, outcome).sim_seconds == 2.0  # the server waited for the deadline
    on_time = RoundOutcome(selected=1, accepted=1, devices=[("fast-0", "accepted", 1.5, 0.2)])
    assert state.close_round(2, on_time).sim_seconds == 1.5  # the slowest accepted device
    assert state.state[1].stragglers == 1 and state.state[0].contributed == 1


def test_availability_draws_are_seeded_and_near_the_declared_share(tmp_path):
    state = fleet_state(tmp_path, seed=3)
    rounds = range(1, 201)
    online = [state.online(r) for r in rounds]
    assert online == [fleet_state(tmp_path, seed=3).online(r) for r in rounds]
    assert all({0, 1, 2} <= set(o) for o in online)  # availability 1
    share = sum(3 in o for o in online) / len(online)
    assert 0.4 < share < 0.6  # availability 0.5
    assert online != [fleet_state(tmp_path, seed=4).online(r) for r in rounds]


def test_uniform_selection_samples_k_online_devices_reproducibly(tmp_path):
    state = fleet_state(tmp_path)
    chosen = state.select(1, [0, 1, 2, 3], 2, bytes_down=1e4, bytes_up=1e3)
    assert len(chosen) == 2 and set(chosen) <= {0, 1, 2, 3}
    assert chosen == fleet_state(tmp_path).select(1, [0, 1, 2, 3], 2, bytes_down=1e4,
                                                  bytes_up=1e3)
    assert state.select(1, [0], 3, bytes_down=1e4, bytes_up=1e3) == [0]  # fewer online


def test_aware_selection_skips_devices_expected_to_miss_the_deadline(tmp_path):
    state = fleet_state(tmp_path, policy="aware", deadline_s=5.0)
    # slow devices: 10 kB at 0.01 Mbit/s is 8 s; fast ones: milliseconds
    chosen = state.select(1, [0, 1, 2, 3, 4], 3, bytes_down=1e4, bytes_up=1e3)
    assert chosen == [0, 1, 2]
    uniform = fleet_state(tmp_path, deadline_s=5.0)
    picks = [uniform.select(r, [0, 1, 2, 3, 4], 3, bytes_down=1e4, bytes_up=1e3)
             for r in range(1, 30)]
    assert any(3 in p or 4 in p for p in picks)  # Flower's rule takes whoever comes


def test_aware_selection_fills_up_only_with_devices_close_to_feasible(tmp_path):
    near = fleet_state(tmp_path, policy="aware", deadline_s=8.0)  # slow ones expect 9.1 s
    near.class_step["slow"] = StepCost(1e5, 1e-4)  # known: no trial, only a fill
    assert near.select(1, [0, 3, 4], 2, bytes_down=1e4, bytes_up=1e3) == [0, 3]
    far = fleet_state(tmp_path, policy="aware", deadline_s=5.0)
    assert far.select(1, [0, 3, 4], 2, bytes_down=1e4, bytes_up=1e3) == [0]


def test_aware_selection_is_round_robin_among_feasible_devices(tmp_path):
    fleet = load_fleet(SHIPPED)
    steps = {name: StepCost(1e4, 1e-5) for name in fleet.classes}
    state = FleetState(fleet, policy="aware", deadline_s=30.0, step_defaults=steps,
                       examples_default=24, batch_size=32, epochs=1)
    k, seen = 6, set()
    for round_ in range(1, 41):
        state.recharge()
        online = state.online(round_)
        chosen = state.select(round_, online, k, bytes_down=8e4, bytes_up=2e4)
        state.mark_selected(round_, chosen)
        for i in chosen:
            seen.add(i)
            cost = state.expected(i, 8e4, 2e4)
            state.settle(i, cost)
        assert len(chosen) == min(k, len(online))
    assert len(seen) == len(fleet)  # nobody starved


def test_aware_selection_waits_for_an_empty_battery_to_recharge(tmp_path):
    state = fleet_state(tmp_path, policy="aware")
    state.state[3].charge_j = 0.0
    cost = state.expected(3, 1e4, 1e3)
    assert cost is not None and cost.energy_j > 0
    assert 3 not in state.select(5, [0, 1, 2, 3], 4, bytes_down=1e4, bytes_up=1e3)
    state.state[3].charge_j = 5.0
    state.mark_selected(4, [0, 1, 2])  # device 3 has waited longest: first in line
    assert 3 in state.select(5, [0, 1, 2, 3], 1, bytes_down=1e4, bytes_up=1e3)


def test_an_untried_class_near_its_limits_gets_a_trial_then_its_replies_decide(tmp_path):
    state = fleet_state(tmp_path, policy="aware", deadline_s=8.0)  # slow ones expect 9.1 s
    assert state.untried(3)
    state.mark_selected(1, [0, 1, 2])
    assert 3 in state.select(2, [0, 1, 2, 3], 1, bytes_down=1e4, bytes_up=1e3)  # a trial
    state.settle(3, state.expected(3, 1e4, 1e3), examples=20, steps=1)  # it straggles
    assert not state.untried(4)  # the class is known now, slow-1 included
    state.mark_selected(2, [3])
    assert state.select(3, [0, 1, 2, 3, 4], 2, bytes_down=1e4, bytes_up=1e3) == [0, 1]
    far = fleet_state(tmp_path, policy="aware", deadline_s=5.0)  # 1.8x: not even a trial
    far.mark_selected(1, [0, 1, 2])
    assert far.select(2, [0, 1, 2, 3], 1, bytes_down=1e4, bytes_up=1e3) == [0]


def test_a_reply_corrects_the_estimate(tmp_path):
    state = fleet_state(tmp_path)
    before = state.expected(0, 1e4, 1e3)
    clock = state.fleet.devices[0].profile.chip.clock_mhz * 1e6
    steps = local_steps(100, 32, 1)
    state.settle(0, DeviceCost(steps * 4e5 / clock, 0.01, steps * 2e-4, 0.0), examples=100,
                 steps=steps)
    after = state.expected(0, 1e4, 1e3)
    assert after.compute_s == pytest.approx(steps * 4e5 / clock)
    assert after.compute_s > before.compute_s


def test_fleet_state_survives_a_resume(tmp_path):
    state = fleet_state(tmp_path)
    state.mark_selected(4, [3])
    state.settle(3, DeviceCost(1.0, 1.0, 0.5, 1.0), examples=40, steps=2)
    again = fleet_state(tmp_path)
    again.restore(state.to_json())
    assert again.state[3] == state.state[3]
    again.restore({"slow-0": {"charge_j": "lots", "selected": True, "step": [1]}})  # ignored
    assert again.state[3] == state.state[3]
    summary = state.summary()
    assert summary["classes"]["slow"]["contributed"] == 1
    assert summary["contributed_share"] == pytest.approx(1 / 5)


def test_time_and_energy_to_accuracy_add_up_until_each_target():
    history = [{"accuracy": 0.5, "sim_seconds": 2.0, "sim_energy_j": 1.0},
               {"accuracy": 0.85, "sim_seconds": 3.0, "sim_energy_j": 2.0},
               {"accuracy": 0.8, "sim_seconds": 1.0, "sim_energy_j": 1.0},
               {"accuracy": 0.93, "sim_seconds": 4.0, "sim_energy_j": 0.5}]
    assert to_accuracy(history, "sim_seconds") == {"0.8": 5.0, "0.9": 10.0, "0.95": None}
    assert to_accuracy(history, "sim_energy_j") == {"0.8": 3.0, "0.9": 4.5, "0.95": None}
    old = [{"accuracy": 0.99}]  # a run without a fleet, or from before fleets
    assert to_accuracy(old, "sim_seconds") == {"0.8": None, "0.9": None, "0.95": None}


def test_fleet_run_config_keys():
    config = RunConfig.parse({"fleet": str(SHIPPED), "round-deadline-s": 20.0,
                              "selection": "aware"})
    assert config.selection == "aware" and config.round_deadline_s == 20.0
    for bad, needle in (({"selection": "aware"}, "selection needs a fleet"),
                        ({"round-deadline-s": 5.0}, "round-deadline-s needs a fleet"),
                        ({"fleet": "f.toml", "selection": "oort"}, "selection='oort'"),
                        ({"fleet": "f.toml", "round-deadline-s": -1.0}, "round-deadline-s=-1")):
        with pytest.raises(ConfigError, match=needle):
            RunConfig.parse(bad)


def test_fleet_errors_are_user_errors():
    with pytest.raises(UserError, match="classes"):
        parse_fleet({"classes": {}})
