"""One federated run on the server side: rounds, global evaluation, checkpoints and run records
(the files are laid out by `shared.rundir`).

`Federation.run(grid)` drives the configured Flower strategy (`server.strategy`). After each round
it evaluates the global model on the test split, writes the checkpoint atomically, appends the
round to metrics.jsonl and tells the observer. With `resume=True` it continues after the newest
checkpoint whose hash verifies (a corrupt newest one is skipped with a message) and keeps
metrics.jsonl to the rounds before it, so no finished round is lost or repeated. The first round
waits for `min-clients` devices, later ones for `min-nodes`, each wait bounded by
`node-wait-timeout` (`DeviceWait`; then `DevicesLost` ends the run). A Federation holds
its run directory's lock (`RunDir.lock`) from construction to the end of `run`. At the end it
profiles one training step of the final global model (a test batch of `batch-size`) on the
configured chip (`shared.neurocore`) and writes that report to `neurocore/`. In train-mode
`qann` the global model is a clip-quantize ANN; after the last round it is converted to an SNN
and calibrated on the train split (`shared.convert`), and summary.json's `conversion` block holds
both accuracies. With a fleet (run-config `fleet`, `shared.fleet`) every round also records the
devices' simulated seconds and joules, `fleet.json` keeps each device's state (battery, counts,
cost estimate; restored by `--resume`), and summary.json gains `fleet`, `time_to_accuracy` and
`energy_to_accuracy`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from server.fleet import FleetSelection
from server.strategy import RoundStats, make_strategy, privacy_summary
from shared.byzantine import KIND_KEY, NODES_KEY, check_kind
from shared.checkpoint import atomic_write, save_checkpoint
from shared.config import RunConfig
from shared.data import load_dataset
from shared.errors import RunError
from shared.fleet import ACCURACY_TARGETS, FleetState, load_fleet, step_costs, to_accuracy
from shared.rebuild import build_from_spec, converted_metadata
from shared.rundir import RoundRecord, RunDir
from shared.snn import evaluate_model, federated_state, load_federated_state, model_layout

log = logging.getLogger("spikefed")


class Observer(Protocol):
    """Receives a run's progress (the CLI's live display, the metrics exporter)."""

    def on_start(self, config: RunConfig, first_round: int, initial: dict[str, Any]) -> None: ...
    def on_round_start(self, stats: RoundStats) -> None: ...
    def on_round_end(self, record: RoundRecord) -> None: ...


class Observers:
    """Several observers as one, called in order (e.g. the live display and the exporter)."""

    def __init__(self, *observers: Observer | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def on_start(self, config: RunConfig, first_round: int, initial: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_start(config, first_round, initial)

    def on_round_start(self, stats: RoundStats) -> None:
        for observer in self.observers:
            observer.on_round_start(stats)

    def on_round_end(self, record: RoundRecord) -> None:
        for observer in self.observers:
            observer.on_round_end(record)


class DevicesLost(RunError):
    """Too few devices stayed connected for longer than `node-wait-timeout`: the run ends (exit
    code 1), its checkpoints intact for `--resume`."""

    exit_code = 1


class DeviceWait:
    """The Grid the strategy sees: Flower's, with its wait for devices bounded.

    Flower's `sample_nodes` polls `get_node_ids()` once a second, with no deadline, until the
    strategy's `min_available_nodes` are connected. This proxy counts how long the connected set
    has stayed below that number and raises `DevicesLost` after `deadline_s` seconds. The
    Federation lowers `min_available_nodes` from `min-clients` to `min-nodes` once the first
    round is done, so later rounds go on with the devices still connected."""

    def __init__(self, grid: Grid, strategy: Any, deadline_s: float,
                 clock: Any = time.monotonic) -> None:
        self._grid, self._strategy = grid, strategy
        self._deadline_s, self._clock = deadline_s, clock
        self._short_since: float | None = None
        self.done_rounds = 0  # the global round the run has finished (for the message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Any:
        ids = list(self._grid.get_node_ids())
        needed = int(self._strategy.min_available_nodes)
        if len(ids) >= needed:
            self._short_since = None
            return ids
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self._deadline_s:
            raise DevicesLost(
                f"waited {self._deadline_s:g} s (node-wait-timeout) for {needed} devices, "
                f"{len(ids)} connected; the checkpoints up to round {self.done_rounds} are "
                "intact: start the devices and rerun with --resume"
            )
        return ids


class Federation:
    def __init__(
        self,
        config: RunConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        observer: Observer | None = None,
        byzantine_nodes: int = 0,
        byzantine_kind: str = "sign-flip",
    ) -> None:
        """`byzantine_nodes` > 0 (simulation only, with the `client.byzantine:app` component) asks
        the nodes with partition-id < that number to send `byzantine_kind` updates."""
        self.config = config
        self.byzantine = (byzantine_nodes, check_kind(byzantine_kind)) if byzantine_nodes else None
        self.out_dir = Path(out_dir or config.out_dir)
        self.run_dir = RunDir(self.out_dir)
        self.observer = observer
        torch.manual_seed(config.seed)
        self.spec = config.model_spec()
        self.model = build_from_spec(self.spec)
        self.test_set = load_dataset(config.dataset, "test", data_dir=config.data_dir or None,
                                     framing=config.framing())
        self.history: list[RoundRecord] = []
        self.round_offset = 0
        self.last_checkpoint: Path | None = None
        self.chip_summary: dict[str, Any] | None = None  # the final chip report's totals
        self.conversion: dict[str, Any] | None = None  # train-mode qann: the converted SNN
        self.fleet = load_fleet(config.fleet) if config.fleet else None  # FleetError: exit 2
        self.simulation = False  # set by server.run.simulate: devices bound to data partitions
        self.fleet_state: FleetState | None = None
        self._lock = self.run_dir.lock()  # held until the run ends (or this process does)
        try:
            done = self.run_dir.check_start(resume)
            if resume:
                self._resume(done)
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Release the run directory (`run` does at its end)."""
        self._lock.release()

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, done: int) -> None:
        path, tensors, meta = self.run_dir.last_good_checkpoint()  # type: ignore[misc]
        if meta.get("model") != self.spec:
            raise RunError(
                f"--resume: {path} holds model {meta.get('model')}, but the run config asks for "
                f"{self.spec}; resume with the run's original --run-config"
            )
        load_federated_state(self.model, tensors)
        self.round_offset = done
        self.last_checkpoint = path
        self.history = [r for r in self.run_dir.read_history() if r.round <= done]
        self.run_dir.write_history(self.history)
        log.info("resuming after round %d from %s", done, path)

    # -- the run -----------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        try:
            return self._run(grid)
        finally:
            self.close()

    def _run(self, grid: Grid) -> dict[str, Any]:
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remaining = config.num_server_rounds - self.round_offset
        started = time.perf_counter()
        loss, accuracy = evaluate_model(self.model, self.test_set, config.eval_batch_size)
        initial = {"round": self.round_offset, "accuracy": accuracy, "loss": loss}
        if self.observer:
            self.observer.on_start(config, self.round_offset + 1, initial)
        if remaining > 0:
            selection = self._fleet_selection() if self.fleet is not None else None
            strategy = make_strategy(config, round_offset=self.round_offset, fleet=selection)
            if self.observer:
                strategy.on_round_start = self.observer.on_round_start
            self._strategy = strategy
            self._devices = DeviceWait(grid, strategy, config.node_wait_timeout)
            self._devices.done_rounds = self.round_offset
            grid = self._devices  # type: ignore[assignment]
            train_config = config.to_flwr()
            if self.byzantine:
                train_config.update({NODES_KEY: self.byzantine[0], KIND_KEY: self.byzantine[1]})
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(federated_state(self.model)),
                num_rounds=remaining,
                timeout=config.round_timeout,
                train_config=ConfigRecord(train_config),
                evaluate_config=ConfigRecord(config.to_flwr()),
                evaluate_fn=self._evaluate_round,
            )
        if config.train_mode == "qann" and self.history:
            self.conversion = self._convert_global()
        self.chip_summary = self._write_chip_report()
        return self._write_summary(initial, time.perf_counter() - started)

    def _fleet_selection(self) -> FleetSelection:
        """The fleet's state (restored from fleet.json on resume) with the selection's step-cost
        estimates: one training step of the initial global model on each device class's chip."""
        config, fleet = self.config, self.fleet
        assert fleet is not None
        x, y = self.test_set.tensors
        x, y = model_layout(x[: config.batch_size]), y[: config.batch_size]
        profiles = {d.klass: d.profile for d in fleet.devices}
        steps = step_costs(profiles, self.model, x, y, optimizer=config.optimizer,
                           train_precision=config.train_precision)
        train_size = len(load_dataset(config.dataset, "train", data_dir=config.data_dir or None,
                                      framing=config.framing()))
        state = FleetState(fleet, seed=config.seed, deadline_s=config.round_deadline_s,
                           policy=config.selection, batch_size=config.batch_size,
                           epochs=config.local_epochs,
                           examples_default=train_size // max(1, len(fleet)),
                           step_defaults=steps)
        saved = self.run_dir.fleet_file
        if self.round_offset > 0 and saved.is_file():
            try:
                state.restore(json.loads(saved.read_text()).get("devices", {}))
            except (ValueError, AttributeError) as err:
                log.warning("%s unreadable (%s): the fleet starts afresh", saved, err)
        self.fleet_state = state
        return FleetSelection(state, bind_partitions=self.simulation)

    def _write_fleet_state(self) -> None:
        if self.fleet_state is not None:
            data = {"summary": self.fleet_state.summary(), "devices": self.fleet_state.to_json()}
            atomic_write(self.run_dir.fleet_file, (json.dumps(data, indent=1) + "\n").encode())

    def _write_chip_report(self) -> dict[str, Any] | None:
        """The chip report of the last round: one training step of the final global model on the
        first `batch-size` test samples, written to `<out>/neurocore/` (JSON, CSV, plots)."""
        config = self.config
        if config.chip == "none" or not self.history:
            return None
        from shared.neurocore import ChipConfig, NeuroCore

        x, y = self.test_set.tensors
        x, y = model_layout(x[: config.batch_size]), y[: config.batch_size]
        preset = ChipConfig.preset(config.chip, optimizer=config.optimizer)
        chip = NeuroCore(preset.for_training(config.resolved_train_precision()))
        out = self.run_dir.neurocore_dir
        round_ = self.history[-1].round
        report = chip.write_report(
            self.model, x, y, out, model_name=config.model,
            extra={"round": round_, "chip_preset": config.chip, "batch": "first test samples"},
        )
        return {
            "round": round_,
            "chip": config.chip,
            "energy_j": report.energy_j,
            "cycles": report.cycles,
            "dram_bytes": report.dram_bytes,
            "gpu_dram_bytes": report.gpu_dram_bytes,
            "dram_reduction": report.dram_reduction,
            "report": str(out / "report.json"),
        }

    def _convert_global(self) -> dict[str, Any]:
        """train-mode qann: convert the final global QC-ANN to an SNN of IF neurons at T =
        time-steps, calibrate it (phase 2) on a calibration split of the *train* split, evaluate
        it on the test split and checkpoint it beside the ANN as `snn-round-NNN.safetensors`."""
        from shared.convert import dual_phase_convert

        config = self.config
        calib_set = load_dataset(config.dataset, "train", data_dir=config.data_dir or None,
                                 framing=config.framing())
        snn, report = dual_phase_convert(
            self.model, calib_set, config.time_steps, seed=config.seed
        )
        loss, accuracy = evaluate_model(snn, self.test_set, config.eval_batch_size)
        last = self.history[-1]
        path = save_checkpoint(
            self.run_dir.converted_checkpoint(last.round),
            snn.state_dict(),
            {
                "round": last.round,
                "accuracy": accuracy,
                "loss": loss,
                "ann_accuracy": last.accuracy,
                "model": self.spec,  # the QC-ANN it was converted from (build_from_spec)
                "dataset": config.dataset,
                "config": config.to_flwr(),
                **converted_metadata(self.model, snn),
                "stages": report.accuracy,
            },
        )
        log.info("converted SNN (T=%d): accuracy %.4f, QC-ANN %.4f",
                 config.time_steps, accuracy, last.accuracy)
        return {
            "time_steps": config.time_steps,
            "ann_accuracy": last.accuracy,
            "snn_accuracy": accuracy,
            "snn_loss": loss,
            "checkpoint": str(path),
            "calibration_samples": report.calibration_samples,
            "heldout_samples": report.heldout_samples,
            "heldout_stage_accuracy": report.accuracy,
            "layers": [
                {"layer": b.layer, "before": asdict(b), "after": asdict(a)}
                for b, a in zip(report.before, report.after, strict=True)
            ],
        }

    def _evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the initial model was evaluated before the strategy started
        global_round = self.round_offset + server_round
        load_federated_state(self.model, arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(self.model, self.test_set, self.config.eval_batch_size)
        stats = self._strategy.rounds[global_round]
        self.last_checkpoint = save_checkpoint(
            self.run_dir.checkpoint(global_round),
            federated_state(self.model),
            {
                "round": global_round,
                "accuracy": accuracy,
                "loss": loss,
                "model": self.spec,
                "dataset": self.config.dataset,
                "config": self.config.to_flwr(),
            },
        )
        record = RoundRecord(
            round=global_round,
            accuracy=accuracy,
            loss=loss,
            clients=stats.clients,
            failed=stats.failed,
            rejected=stats.rejected,
            rejected_reasons=dict(stats.rejected_reasons),
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            energy_j=stats.energy_j,
            cycles=stats.cycles,
            dram_bytes=stats.dram_bytes,
            duration_s=time.perf_counter() - stats.started,
            train_loss=stats.train_loss,
            train_accuracy=stats.train_accuracy,
            client_accuracy=stats.client_accuracy,
            spike_density=stats.spike_density,
            selected=stats.sampled,
            online=stats.online,
            stragglers=stats.stragglers,
            out_of_energy=stats.out_of_energy,
            sim_seconds=stats.sim_seconds,
            sim_energy_j=stats.sim_energy_j,
            energy_by_class=dict(stats.energy_by_class),
        )
        self.history.append(record)
        self._write_fleet_state()  # before the round counts as done: a resume continues from it
        self.run_dir.append_round(record)  # fsynced: from here on the round counts as done
        # min-clients is what the first round waits for; later rounds go on with the devices
        # still connected, at least min-nodes (a device lost for good never hangs the run)
        self._strategy.min_available_nodes = min(self._strategy.min_available_nodes,
                                                 self.config.min_nodes)
        self._devices.done_rounds = global_round
        if self.observer:
            self.observer.on_round_end(record)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _write_summary(self, initial: dict[str, Any], seconds: float) -> dict[str, Any]:
        last = self.history[-1].to_json() if self.history else initial
        history = [r.to_json() for r in self.history]
        summary = {
            "rounds": len(self.history),
            "final_accuracy": last["accuracy"],
            "final_loss": last["loss"],
            "best_accuracy": max((r.accuracy for r in self.history), default=None),
            "initial": initial,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "duration_s": seconds,
            "model": self.spec,
            "rejected_updates": sum(r.rejected for r in self.history),
            "privacy": privacy_summary(self.config),
            "byzantine": (
                {"nodes": self.byzantine[0], "kind": self.byzantine[1]} if self.byzantine else None
            ),
            "history": [r.to_json() for r in self.history],
            "fleet": self.fleet_state.summary() if self.fleet_state is not None else None,
            "time_to_accuracy": to_accuracy(history, "sim_seconds", ACCURACY_TARGETS),
            "energy_to_accuracy": to_accuracy(history, "sim_energy_j", ACCURACY_TARGETS),
            "neurocore": self.chip_summary,
            "conversion": self.conversion,
            "config": self.config.to_flwr(),
        }
        self.run_dir.write_summary(summary)
        return summary

