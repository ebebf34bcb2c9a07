"""client.hostile: every shape the hostile mod sends is refused by the server's validation (or,
where the contract allows it, accepted harmlessly), the mod touches only the chosen nodes, and a
real federation with a hostile node completes every round and counts the rejections."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from support import message

from client.hostile import EVALUATE_SHAPES, SHAPES, hostile_app, shape_for
from server.validation import Rejected, accept, accept_evaluate
from shared import reply
from shared.config import RunConfig
from shared.rebuild import build_from_spec
from shared.snn import federated_state

GLOBAL = {"fc.weight": np.linspace(-0.3, 0.3, 12, dtype=np.float32).reshape(3, 4),
          "bn.weight": np.ones(3, np.float32), "bn.running_mean": np.zeros(3, np.float32),
          "bn.running_var": np.ones(3, np.float32), "fc.bias": np.zeros(3, np.float32)}
HARMLESS = {"claims 1e6 examples"}  # accepted: its weight is capped by the server
HARMLESS_EVALUATION = {"zero examples"}  # accepted: left out of the average


def honest(bits: int) -> RecordDict:
    new = {k: torch.from_numpy(v + 0.01) for k, v in GLOBAL.items()}
    arrays, scales = reply.encode(new, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, bits)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"loss": 1.0, "accuracy": 0.5,
                                                   "num-examples": 100, "energy-j": 0.1,
                                                   "cycles": 10, "spike-density": 0.2})})
    if scales is not None:
        content["update-scales"] = ConfigRecord(scales)
    return content


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_train_shape_is_rejected_or_harmless(shape, bits):
    accept(honest(bits), GLOBAL, bits=bits)  # the honest reply passes
    content = honest(bits)
    SHAPES[shape](content, bits)
    if shape in HARMLESS:
        accept(content, GLOBAL, bits=bits)
        return
    with pytest.raises(Rejected):
        accept(content, GLOBAL, bits=bits)


@pytest.mark.parametrize("shape", list(EVALUATE_SHAPES))
def test_every_evaluate_shape_is_rejected_or_harmless(shape):
    content = RecordDict({"metrics": MetricRecord({"loss": 0.3, "accuracy": 0.9,
                                                   "num-examples": 50})})
    EVALUATE_SHAPES[shape](content, 8)
    if shape in HARMLESS_EVALUATION:
        assert accept_evaluate(content) == 0
        return
    with pytest.raises(Rejected):
        accept_evaluate(content)


def test_hostile_nodes_take_consecutive_shapes_each_round():
    names = [shape_for(SHAPES, r, p, 2) for r in (1, 2, 3) for p in (0, 1)]
    assert names == list(SHAPES)[:6]


def test_the_mod_rewrites_only_the_chosen_nodes_replies():
    config = RunConfig.parse({"dataset": "digits", "model": "mlp", "time-steps": 2,
                              "local-epochs": 1, "batch-size": 64, "chip": "none"})
    torch.manual_seed(0)
    state = federated_state(build_from_spec(config.model_spec()))
    app = hostile_app(1)

    def train(partition_id: int) -> RecordDict:
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(
            {**config.to_flwr(), "server-round": 1})})
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                          node_config={"partition-id": partition_id, "num-partitions": 3})
        return app(message(content, "train"), context).content

    sent = {k: v.numpy() for k, v in state.items()}
    with pytest.raises(Rejected) as err:  # round 1, partition 0: the first shape
        accept(train(0), sent, bits=config.update_bits)
    assert err.value.reason == "type"  # "arrays" sent as a ConfigRecord
    accept(train(1), sent, bits=config.update_bits)  # partition 1 stays honest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_federation_with_a_hostile_node_completes_and_counts_rejections(tmp_path: Path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server.federation import Federation

    config = RunConfig.parse({"dataset": "digits", "model": "mlp", "time-steps": 2,
                              "local-epochs": 1, "batch-size": 64, "chip": "none",
                              "num-server-rounds": 2, "min-clients": 3, "min-nodes": 2,
                              "metrics-port": 0, "out-dir": str(tmp_path)})
    federation = Federation(config, tmp_path)
    summary: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        summary.update(federation.run(grid))

    run_simulation(server_app=server_app, client_app=hostile_app(1), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 "log_to_driver": False}})
    assert summary["rounds"] == 2
    assert summary["rejected_updates"] >= 2  # node 0's train reply each round (+ evaluations)
    reasons = {k for r in summary["history"] for k in r["rejected_reasons"]}
    assert reasons and reasons <= set(reply.REASONS)
    assert all(r["clients"] == 2 for r in summary["history"])
    assert math.isfinite(summary["final_accuracy"]) and summary["final_accuracy"] > 0.5
