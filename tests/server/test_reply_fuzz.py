"""A property-based fuzzer of the reply contract: hostile replies (`client.hostile.mutate`: every
record-kind swap, missing / extra / duplicated records and keys, wrong dtypes and shapes, empty and
oversized arrays, NaN / inf / huge / negative values, lists where scalars belong, forged headers,
bought weight) mixed with honest ones, driven through `make_strategy(config)` and its hooks for
every strategy (and DP-wrapped) at update-bits 32 and 8.

Properties: no exception leaves a hook; every hostile reply is rejected or harmless (the aggregate
is a usable model within the value bounds, or the round keeps the model); where every hostile reply
was rejected, the aggregate equals the honest-only aggregate. This is the short profile; the long
one (>= 10,000 cases) is `python bench/hostile_replies.py --examples 10000`, which runs `fuzz_case`
from this module.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import reply

from client.hostile import mutate
from server.strategy import make_strategy
from server.validation import unusable
from shared import reply as contract
from shared.config import RunConfig

GLOBAL = {"conv.weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
          "bn.weight": np.ones(2, dtype=np.float32),
          "bn.running_mean": np.zeros(2, dtype=np.float32),
          "bn.running_var": np.ones(2, dtype=np.float32),
          "fc.bias": np.zeros(5, dtype=np.float32)}
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
              "bulyan", "dp-fedavg")
HONEST = 7  # Bulyan needs 4f + 3 = 7 valid replies with f = 1


class Grid:
    """The part of Flower's Grid that configure_train / configure_evaluate use."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))


def identify_task() -> None:
    """Flower builds instructions only inside a run: give this process a run identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def config_for(name: str, bits: int) -> RunConfig:
    raw = {"strategy": name.removeprefix("dp-"), "min-clients": HONEST, "min-nodes": 2,
           "update-bits": bits, "krum-malicious": 1}
    if name.startswith("dp-"):
        raw["dp-clipping-norm"] = 10.0  # clip only: no noise, so runs compare exactly
    return RunConfig.parse(raw)


@cache
def _honest_update(seed: int, bits: int) -> tuple[dict[str, np.ndarray], dict | None]:
    rng = np.random.default_rng(seed)
    new = {name: torch.from_numpy((base + 0.01 * (seed % 5) + 1e-3 * rng.standard_normal(
        base.shape)).astype(np.float32)) for name, base in GLOBAL.items()}
    return contract.encode(new, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, bits)


def honest_train(seed: int, bits: int) -> RecordDict:
    """A fresh honest train reply (records are rebuilt every call: strategies consume them)."""
    arrays, scales = _honest_update(seed, bits)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}),
        "metrics": MetricRecord({"loss": 1.0 + 0.1 * seed % 7, "accuracy": 0.5,
                                 "num-examples": 100 + 10 * (seed % 7), "energy-j": 0.5,
                                 "cycles": 1000, "spike-density": 0.1}),
    })
    if scales is not None:
        content["update-scales"] = ConfigRecord(dict(scales))
    return content


def honest_evaluate(seed: int) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({
        "loss": 0.5 + 0.01 * seed, "accuracy": 0.5 + 0.01 * (seed % 7),
        "num-examples": 50 + seed % 7})})


@dataclass
class Case:
    """What one fuzz case did: the hostile changes, how many replies were rejected, and the
    property violations found (empty: the case passed)."""

    strategy: str
    bits: int
    changes: list[list[str]] = field(default_factory=list)
    hostile: int = 0
    rejected: int = 0
    problems: list[str] = field(default_factory=list)


def _train_round(name: str, bits: int, contents: list[RecordDict]):
    strategy = make_strategy(config_for(name, bits))
    sent = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, sent, ConfigRecord({}), Grid(len(contents))))
    arrays, metrics = strategy.aggregate_train(1, [reply(c, i + 1) for i, c in enumerate(contents)])
    return arrays, metrics, strategy.rounds[1]


def _evaluate_round(name: str, contents: list[RecordDict]):
    strategy = make_strategy(config_for(name, 32))
    sent = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_evaluate(1, sent, ConfigRecord({}), Grid(len(contents))))
    replies = [reply(c, i + 1, kind="evaluate") for i, c in enumerate(contents)]
    metrics = strategy.aggregate_evaluate(1, replies)
    return metrics, strategy.rounds[1]


def _same(a: ArrayRecord | None, b: ArrayRecord | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-7) for k in a.keys())


def _finite_metrics(metrics: MetricRecord | None) -> bool:
    return metrics is None or all(
        math.isfinite(v) for value in metrics.values()
        for v in (value if isinstance(value, list) else [value]))


def fuzz_case(name: str, bits: int, pick: Callable[[Sequence[Any]], Any]) -> Case:
    """One train round and one evaluate round of `name` at `bits`: HONEST honest replies plus 1-2
    hostile ones drawn with `pick`, against the honest-only rounds. Raises whatever a hook raises
    (a crash); returns the case with its property violations."""
    case = Case(name, bits)  # any exception from here on comes out of a hook: a crash
    case.hostile = pick((1, 1, 2))
    hostile = []
    for j in range(case.hostile):
        content = honest_train(100 + j, bits)
        case.changes.append(mutate(content, bits, pick))
        hostile.append(content)
    arrays, metrics, stats = _train_round(
        name, bits, [honest_train(i, bits) for i in range(HONEST)] + hostile)
    reference, _, clean = _train_round(name, bits, [honest_train(i, bits) for i in range(HONEST)])
    case.rejected = stats.rejected
    if clean.rejected:
        case.problems.append(f"an honest reply was rejected: {clean.rejected_reasons}")
    if sum(stats.rejected_reasons.values()) != stats.rejected:
        case.problems.append("rejections not counted by reason")
    if stats.rejected == case.hostile and not _same(arrays, reference):
        case.problems.append("hostile replies rejected, yet the aggregate is not the honest one")
    if arrays is not None and unusable(arrays, GLOBAL) is not None:
        case.problems.append(f"a hostile reply broke the model: {unusable(arrays, GLOBAL)}")
    if not _finite_metrics(metrics):
        case.problems.append(f"non-finite aggregated metrics {metrics}")
    if not all(math.isfinite(v) for v in (stats.energy_j, stats.cycles, stats.dram_bytes)):
        case.problems.append("non-finite chip totals")

    evaluations = []
    for j in range(case.hostile):
        content = honest_evaluate(100 + j)
        case.changes.append(mutate(content, bits, pick))
        evaluations.append(content)
    metrics, stats = _evaluate_round(name, [honest_evaluate(i) for i in range(HONEST)]
                                     + evaluations)
    reference, _ = _evaluate_round(name, [honest_evaluate(i) for i in range(HONEST)])
    case.rejected += stats.rejected
    if stats.rejected == case.hostile and dict(metrics or {}) != dict(reference or {}):
        # a hostile evaluation that claims 0 examples is accepted and left out: the same result
        case.problems.append("hostile evaluations rejected, yet the metrics differ")
    if not _finite_metrics(metrics) or (
            metrics is not None and not 0 <= metrics.get("accuracy", 0) <= 1):
        case.problems.append(f"hostile evaluation moved the metrics out of bounds: {metrics}")
    return case


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower's Bulyan calls gc.collect() per array record (0.25 s each in a test process): not
    # what is under test, and 20 x the fuzzer's time
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    identify_task()
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", STRATEGIES)
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_hostile_reply_crashes_or_moves_the_aggregate(name, bits, data):
    case = fuzz_case(name, bits, lambda options: data.draw(st.sampled_from(list(options))))
    assert not case.problems, (case.changes, case.problems)
