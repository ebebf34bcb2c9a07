"""server.fleet on Flower's strategy hooks, the fleet in the run's records (history, summary,
report, Prometheus, monitor), the commands' --fleet, and one real simulation of a small fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from support import reply

from server.fleet import FleetSelection
from server.metrics import MetricsExporter
from server.monitor import parse_metrics, render
from server.report import write_report
from server.strategy import make_strategy
from shared.config import RunConfig
from shared.fleet import DeviceProfile, FleetState, StepCost, load_fleet
from shared.rundir import RoundRecord

FLEET = """
name = "lab"
[classes.fast]
count = 3
chip = "edge-int8"
uplink_mbps = 50.0
downlink_mbps = 50.0
[classes.slow]
count = 1
chip = { preset = "edge-int8", cores = 1 }
uplink_mbps = 0.01
downlink_mbps = 0.01
latency_ms = 500.0
"""
SENT = {"w": np.ones(4, dtype=np.float32)}
NODES = [11, 12, 13, 14]  # sorted: devices fast-0, fast-1, fast-2, slow-0


class Grid:
    """The part of Flower's Grid a strategy's configure hooks use."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a run need Flower's task identity (as a ServerApp has it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "lab.toml"
    path.write_text(FLEET)
    return path


def fleet_strategy(fleet_file: Path, policy: str, deadline: float = 5.0, **raw):
    config = RunConfig.parse({"fleet": str(fleet_file), "selection": policy,
                              "round-deadline-s": deadline, "min-clients": 4, "update-bits": 32},
                             **raw)
    state = FleetState(load_fleet(fleet_file), seed=0, deadline_s=deadline, policy=policy,
                       batch_size=32, epochs=1, examples_default=20,
                       step_defaults={"fast": StepCost(1e5, 1e-4), "slow": StepCost(4e5, 1e-4)})
    return make_strategy(config, fleet=FleetSelection(state))


def train_reply(node: int, value: float, round_: int = 1, **metrics) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))}),
        "metrics": MetricRecord({"loss": 1.0, "accuracy": 0.5, "num-examples": 20, **metrics}),
    })
    return reply(content, node=node, round_=round_)


def sent() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in SENT.items()})


def test_aware_selection_sends_each_chosen_device_its_profile(fleet_file):
    strategy = fleet_strategy(fleet_file, "aware", fraction_train=0.75)
    messages = list(strategy.configure_train(1, sent(), ConfigRecord({"lr": 0.1}), Grid(NODES)))
    assert len(messages) == 3  # Flower's sample size: 0.75 x 4
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]  # not the slow one
    for msg in messages:
        device = msg.content["device"]
        assert device["class"] == "fast" and device["name"].startswith("fast-")
        profile = DeviceProfile.model_validate(json.loads(device["profile"]))
        assert profile.uplink_mbps == 50.0
        assert msg.content["config"]["lr"] == 0.1  # Flower's own config travels unchanged
        assert msg.content["arrays"]["w"].numpy().tolist() == [1.0] * 4
    stats = strategy.rounds[1]
    assert stats.sampled == 3 and stats.online == 4


def test_uniform_selection_takes_flowers_sample_size_from_online_devices(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", fraction_train=0.5)
    chosen = set()
    for round_ in range(1, 9):
        messages = list(strategy.configure_train(round_, sent(), ConfigRecord(), Grid(NODES)))
        assert len(messages) == 2
        chosen |= {m.metadata.dst_node_id for m in messages}
    assert 14 in chosen  # uniform takes the slow device too


def test_a_straggler_and_an_exhausted_device_are_dropped_before_validation(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", deadline=2.0)
    list(strategy.configure_train(1, sent(), ConfigRecord(), Grid(NODES)))
    fleet = strategy.fleet
    fleet.state.state[2].charge_j = 0.1  # fast-2 has a nearly empty battery
    replies = [
        train_reply(11, 1.0, **{"device-seconds": 1.5, "device-compute-seconds": 1.0,
                                "device-energy-j": 0.3, "device-radio-j": 0.2}),
        train_reply(12, 2.0, **{"device-seconds": 1.0, "device-compute-seconds": 0.5,
                                "device-energy-j": 0.2, "device-radio-j": 0.1}),
        train_reply(13, 9.0, **{"device-seconds": 0.5, "device-compute-seconds": 0.1,
                                "device-energy-j": 0.5, "device-radio-j": 0.4}),
        train_reply(14, 50.0, **{"device-seconds": 9.0, "device-compute-seconds": 1.0,
                                 "device-energy-j": 2.0, "device-radio-j": 1.5}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert float(arrays["w"].numpy()[0]) == pytest.approx(1.5)  # the two that counted
    stats = strategy.rounds[1]
    assert stats.clients == 2 and stats.stragglers == 1 and stats.out_of_energy == 1
    assert stats.rejected == 0  # dropped, not rejected: validation never saw them
    assert stats.sim_seconds == 2.0  # the server waited for the deadline
    assert stats.sim_energy_j == pytest.approx(0.3 + 0.2 + 0.1 + 2.0)  # fast-2 spent its 0.1 J
    assert stats.energy_by_class == pytest.approx({"fast": 0.6, "slow": 2.0})
    summary = fleet.state.summary()
    assert summary["classes"]["slow"]["stragglers"] == 1
    assert summary["classes"]["fast"]["out_of_energy"] == 1


def test_without_device_metrics_the_server_models_the_reply_itself(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", deadline=30.0)
    list(strategy.configure_train(1, sent(), ConfigRecord(), Grid(NODES)))
    strategy.aggregate_train(1, [train_reply(14, 1.0, cycles=2_000_000, **{"energy-j": 0.01})])
    # slow-0: 2e6 cycles at 200 MHz + 2 x 0.5 s latency + the model down and the update up
    serialized = len(Array(np.zeros(4, dtype=np.float32)).data)
    expected = 2e6 / 200e6 + 1.0 + 2 * 8 * serialized / 1e4
    ((name, verdict, seconds, joules),) = strategy.fleet.state.rounds[1].devices
    assert name == "slow-0" and verdict == "accepted"
    assert seconds == pytest.approx(expected) and joules > 0.01  # chip + radio
    stats = strategy.rounds[1]
    assert stats.stragglers == 0 and stats.sim_energy_j == pytest.approx(joules)
    assert stats.sim_seconds == 30.0  # three selected devices never answered: the deadline


def test_devices_with_their_own_profiles_report_their_round_without_a_server_fleet():
    strategy = make_strategy(RunConfig.parse({"min-clients": 2, "update-bits": 32}))
    strategy.expect(sent())
    strategy.aggregate_train(1, [
        train_reply(1, 1.0, **{"device-seconds": 2.5, "device-compute-seconds": 1.0,
                               "device-energy-j": 0.5, "device-radio-j": 0.2}),
        train_reply(2, 1.0, **{"device-seconds": 4.0, "device-compute-seconds": 1.0,
                               "device-energy-j": 0.25, "device-radio-j": 0.2}),
    ])
    stats = strategy.rounds[1]
    assert stats.sim_seconds == 4.0 and stats.sim_energy_j == pytest.approx(0.75)
    assert stats.clients == 2 and stats.stragglers == 0


def test_devices_offline_this_round_do_not_evaluate(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", fraction_evaluate=1.0)
    list(strategy.configure_train(1, sent(), ConfigRecord(), Grid(NODES)))
    strategy.fleet._online[1] = {11, 13}
    messages = list(strategy.configure_evaluate(1, sent(), ConfigRecord(), Grid(NODES)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 13]
    assert {m.content["device"]["name"] for m in messages} == {"fast-0", "fast-2"}


def test_a_simulation_binds_device_i_to_data_partition_i(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", fraction_train=1.0)
    strategy.fleet.bind_partitions = True
    nodes = [907, 13, 4002, 55]  # Flower's random node ids
    messages = list(strategy.configure_train(1, sent(), ConfigRecord(), Grid(nodes)))
    bound = {m.content["device"]["name"]: (m.content["device"]["partition-id"],
                                           m.content["device"]["num-partitions"])
             for m in messages}
    assert bound == {"fast-0": (0, 4), "fast-1": (1, 4), "fast-2": (2, 4), "slow-0": (3, 4)}


def test_nodes_beyond_the_fleet_get_no_device_and_are_never_selected(fleet_file):
    strategy = fleet_strategy(fleet_file, "uniform", fraction_train=1.0, min_nodes=2)
    nodes = [*NODES, 15, 16]
    strategy.min_available_nodes = 4
    messages = list(strategy.configure_train(1, sent(), ConfigRecord(), Grid(nodes)))
    assert {m.metadata.dst_node_id for m in messages} <= set(NODES)
    assert set(strategy.fleet.node_device) == set(NODES)


OLD_ENTRY = {"round": 1, "accuracy": 0.5, "loss": 1.2, "clients": 2, "bytes_up": 10,
             "bytes_down": 20, "energy_j": 0.1, "duration_s": 3.0}


def fleet_summary() -> dict:
    history = []
    for r, acc in enumerate((0.6, 0.92, 0.96), start=1):
        history.append(RoundRecord(
            round=r, accuracy=acc, loss=1.0 / r, clients=2, selected=3, online=4, stragglers=1,
            sim_seconds=2.0, sim_energy_j=1.5, energy_by_class={"fast": 0.5, "slow": 1.0},
        ).to_json())
    return {"rounds": 3, "final_accuracy": 0.96, "best_accuracy": 0.96, "history": history,
            "initial": {"round": 0, "accuracy": 0.1, "loss": 2.3},
            "config": {"model": "mlp", "fleet": "lab.toml"},
            "fleet": {"name": "lab", "file": "lab.toml", "devices": 4, "selection": "aware",
                      "round_deadline_s": 2.0, "contributed_share": 0.75,
                      "classes": {"fast": {"devices": 3, "selected": 6, "contributed": 6,
                                           "devices_contributed": 3, "stragglers": 0,
                                           "out_of_energy": 0, "energy_j": 1.5},
                                  "slow": {"devices": 1, "selected": 3, "contributed": 0,
                                           "devices_contributed": 0, "stragglers": 3,
                                           "out_of_energy": 0, "energy_j": 3.0}}},
            "time_to_accuracy": {"0.8": 4.0, "0.9": 4.0, "0.95": 6.0},
            "energy_to_accuracy": {"0.8": 3.0, "0.9": 3.0, "0.95": 4.5}}


def test_an_old_history_entry_still_loads_with_empty_fleet_fields():
    record = RoundRecord.from_json(OLD_ENTRY)
    assert record.sim_seconds is None and record.stragglers == 0 and record.energy_by_class == {}
    assert record.selected == 0 and record.out_of_energy == 0


def test_report_plots_the_fleet_and_an_old_summary_still_reports(tmp_path):
    report = write_report(fleet_summary(), tmp_path / "fleet").read_text()
    assert "## Fleet" in report and "| 95.00 % | 6.00 | 4.5 |" in report
    assert "| slow | 1 | 3 | 0 | 0 | 3 | 0 | 3 |" in report
    assert "fleet_accuracy.png" in report and "fleet_rounds.png" in report
    for png in ("fleet_accuracy.png", "fleet_rounds.png"):
        assert (tmp_path / "fleet" / "plots" / png).stat().st_size > 1000
    old = write_report({"rounds": 1, "final_accuracy": 0.5, "history": [OLD_ENTRY],
                        "config": {}}, tmp_path / "old").read_text()
    assert "## Fleet" not in old and not (tmp_path / "old" / "plots" / "fleet_rounds.png").exists()


def test_prometheus_and_the_monitor_show_the_fleet(fleet_file):
    exporter = MetricsExporter()
    config = RunConfig.parse({"fleet": str(fleet_file)})
    exporter.on_start(config, 1, {"accuracy": 0.1, "loss": 2.3})
    text = exporter.exposition().decode()
    assert 'spikefed_fleet_class_energy_joules_total{device_class="slow"} 0.0' in text
    assert 'spikefed_fleet_dropped_updates_total{reason="out-of-energy"} 0.0' in text
    for entry in fleet_summary()["history"]:
        exporter.on_round_end(RoundRecord.from_json(entry))
    snap = parse_metrics(exporter.exposition().decode())
    assert snap.fleet_selected == 3
    assert snap.fleet_dropped == {"straggler": 3.0, "out-of-energy": 0.0}
    assert snap.fleet_sim_seconds == pytest.approx(6.0)
    assert snap.fleet_energy_j == pytest.approx(4.5)
    assert snap.fleet_energy == pytest.approx({"fast": 1.5, "slow": 3.0})
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(snap, __import__("server.monitor").monitor.History(), "http://x"))
    shown = console.export_text()
    assert "fleet (simulated)" in shown and "slow J" in shown


def test_the_commands_refuse_a_bad_fleet_in_one_line(invoke, tmp_path, fleet_file):
    from client.cli import cli as client_cli
    from server.deploy import cli as server_cli
    from server.run import cli as run_cli

    bad = tmp_path / "bad.toml"
    bad.write_text("[classes.a]\ncount = 1\nuplink_mbps = 0\ndownlink_mbps = 1.0\n")
    bad_profile = tmp_path / "bad-device.toml"
    bad_profile.write_text("uplink_mbps = 0\ndownlink_mbps = 1.0\n")
    cases = [
        (run_cli, ["--fleet", str(tmp_path / "none.toml")], "no such file"),
        (run_cli, ["--fleet", str(bad)], "uplink_mbps=0"),
        (run_cli, ["--fleet", str(fleet_file), "--clients", "3"], "has 4 devices"),
        (run_cli, ["--run-config", "selection=aware"], "selection needs a fleet"),
        (server_cli, ["--address", "127.0.0.1:1", "--insecure", "--rounds", "1",
                      "--min-clients", "1", "--out", str(tmp_path / "s"), "--fleet", str(bad)],
         "uplink_mbps=0"),
        (client_cli, ["--server", "127.0.0.1:1", "--insecure", "--partition-id", "0",
                      "--num-partitions", "2", "--device-profile", str(bad_profile)],
         "uplink_mbps=0"),
        (client_cli, ["--server", "127.0.0.1:1", "--insecure", "--partition-id", "0",
                      "--num-partitions", "2", "--device-profile", str(fleet_file)],
         "name the device too"),
        (client_cli, ["--server", "127.0.0.1:1", "--insecure", "--partition-id", "0",
                      "--num-partitions", "2", "--device-profile", str(fleet_file),
                      "--device", "tablet"], "no device or class 'tablet'"),
        (client_cli, ["--server", "127.0.0.1:1", "--insecure", "--partition-id", "0",
                      "--num-partitions", "2", "--device", "slow"], "--device needs"),
    ]
    for app, args, needle in cases:
        outcome = invoke(app, *args)
        assert outcome.code == 2, (args, outcome)
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        assert needle in outcome.stderr and "Traceback" not in outcome.stderr, (args, outcome)
        assert len([line for line in lines if line.startswith("error")]) == 1


@pytest.mark.slow
def test_a_small_heterogeneous_fleet_drops_its_straggler_in_a_real_simulation(tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET.replace("count = 3", "count = 2"))  # 2 fast devices + 1 hopeless
    out = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "server.run", "--fleet", str(fleet), "--rounds", "2",
         "--out", str(out), "--no-evaluate", "--metrics-port", "0", "--run-config",
         "dataset=digits model=mlp time-steps=2 local-epochs=1 fraction-evaluate=0.0 "
         "round-deadline-s=5"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for entry in summary["history"]:
        assert entry["selected"] == 3 and entry["online"] == 3
        assert entry["stragglers"] == 1 and entry["clients"] == 2  # slow-0 missed the deadline
        assert entry["sim_seconds"] == 5.0  # the server waited for it until the deadline
        assert set(entry["energy_by_class"]) == {"fast", "slow"}
        assert entry["sim_energy_j"] == pytest.approx(sum(entry["energy_by_class"].values()))
        assert entry["energy_by_class"]["slow"] > entry["energy_by_class"]["fast"]
    assert set(summary["time_to_accuracy"]) == {"0.8", "0.9", "0.95"}
    assert summary["fleet"]["contributed_share"] == pytest.approx(2 / 3)
    assert summary["fleet"]["classes"]["slow"]["stragglers"] == 2
    state = json.loads((out / "fleet.json").read_text())
    assert state["devices"]["slow-0"]["stragglers"] == 2
    assert state["devices"]["fast-0"]["step"]["cycles"] > 0  # the device reported its figures
    assert "## Fleet" in (out / "report.md").read_text()
    assert "1 stragglers" in result.stdout
