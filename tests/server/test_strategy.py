"""server.strategy: every configured Flower strategy aggregates, the recorder counts rounds, and a
claimed example count cannot buy weight (FedAvg, FedProx, FedAdam)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from support import reply

from server.strategy import make_strategy
from server.validation import capped_weights
from shared.config import RunConfig

SENT = {"w": np.ones(4, dtype=np.float32)}  # the global weights of the round


def float_strategy(raw: dict):
    """A strategy whose clients send float32 weights (update-bits=32), told what it sent."""
    strategy = make_strategy(RunConfig.parse({**raw, "update-bits": 32}))
    strategy.expect(ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    return strategy


def replies(values: list[float], round_: int = 1) -> list[Message]:
    """Fresh train replies whose single array is filled with each value (one reply per value)."""
    out = []
    for i, value in enumerate(values):
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))}),
            "metrics": MetricRecord({"loss": 1.0, "accuracy": 0.5, "num-examples": 10,
                                     "spike-density": 0.1, "energy-j": 0.25}),
        })
        out.append(reply(content, node=i + 1, round_=round_))
    return out


@pytest.mark.parametrize(
    ("name", "robust"),
    [("fedavg", False), ("fedprox", False), ("fedadam", False), ("fedmedian", True),
     ("fedtrimmedavg", True), ("krum", True), ("multikrum", True)],
)
def test_strategies_aggregate_and_robust_ones_resist_an_outlier(name, robust):
    config = RunConfig.parse({"strategy": name, "min-clients": 5, "update-bits": 32})
    strategy = make_strategy(config, round_offset=3)
    strategy.expect(ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    if name == "fedadam":  # FedOpt needs the current global model before aggregating
        strategy.current_arrays = {"w": np.ones(4, dtype=np.float32)}
    arrays, metrics = strategy.aggregate_train(1, replies([1.0, 1.1, 0.9, 1.0, 10.0]))
    value = float(arrays["w"].numpy()[0])
    if robust:
        assert 0.85 < value < 1.15
    elif name != "fedadam":
        assert value == pytest.approx(2.8, rel=1e-5)  # the plain mean follows the outlier
    stats = strategy.rounds[4]  # round 1 after a resume at round 3
    assert stats.clients == 5 and stats.failed == 0
    serialized = len(Array(np.zeros(4, dtype=np.float32)).data)  # .npy bytes that travel
    assert stats.bytes_up == 5 * serialized
    assert stats.energy_j == pytest.approx(1.25)
    assert stats.spike_density == pytest.approx(0.1)


def test_recorder_sums_the_clients_chip_cycles_and_dram_bytes():
    strategy = float_strategy({"min-clients": 3})
    messages = replies([1.0, 2.0, 3.0])
    for i, msg in enumerate(messages):
        metrics = msg.content["metrics"]
        metrics["cycles"] = 1_000_000 * (i + 1)
        metrics["dram-bytes"] = 2**33 + i  # beyond 32 bits
    strategy.aggregate_train(1, messages)
    stats = strategy.rounds[1]
    assert stats.cycles == 6_000_000 and stats.dram_bytes == 3 * 2**33 + 3
    assert stats.energy_j == pytest.approx(0.75)


def _claims_round(name: str, claims: list[float], values: list[float]) -> np.ndarray | None:
    """The aggregate `w` of one round of `name` where reply i claims claims[i] examples."""
    strategy = float_strategy({"strategy": name, "min-clients": len(claims)})
    if name == "fedadam":
        strategy.current_arrays = {k: v.copy() for k, v in SENT.items()}
    messages = replies(values)
    for msg, claim in zip(messages, claims, strict=True):
        msg.content["metrics"]["num-examples"] = claim
    arrays, _ = strategy.aggregate_train(1, messages)
    return None if arrays is None else arrays["w"].numpy()


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
@pytest.mark.parametrize("claim", [1e6, 2**31 - 1, 1e308])
def test_a_huge_claim_moves_the_aggregate_no_further_than_the_largest_honest_share(name, claim):
    honest_claims, honest = [800, 700, 900, 850], [1.0, 1.1, 0.9, 1.05]
    hostile = 5.0  # a plausible update (within MAX_STEP of the global 1.0)
    honest_only = _claims_round(name, honest_claims, honest)
    largest_share = 4 * 850  # WEIGHT_SPREAD x the round's lower median claim: the most any weighs
    attacked = _claims_round(name, [*honest_claims, claim], [*honest, hostile])
    plausible = _claims_round(name, [*honest_claims, largest_share], [*honest, hostile])
    moved = np.abs(attacked - honest_only).max()
    assert moved <= np.abs(plausible - honest_only).max() + 1e-6
    if claim > 2**31 - 1:  # beyond any dataset: refused, the aggregate is the honest one
        assert np.allclose(attacked, honest_only)
    if name == "fedavg":  # the hostile share is 3400 / (3250 + 3400), not ~100 %
        expected = (np.dot(honest_claims, honest) + largest_share * hostile) / (3250 + 3400)
        assert claim > 2**31 - 1 or attacked[0] == pytest.approx(expected, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 2**31 - 1), st.floats(1.0, 2.0**31 - 1)),
                min_size=2, max_size=6))
def test_no_combination_of_claims_zeroes_or_overflows_the_weights(claims):
    values = [1.0 + 0.1 * i for i in range(len(claims))]
    aggregate = _claims_round("fedavg", claims, values)
    assert aggregate is not None and np.isfinite(aggregate).all()
    assert min(values) - 1e-5 <= aggregate[0] <= max(values) + 1e-5  # a convex combination
    weights = capped_weights(claims)
    assert min(weights) >= 1 and np.isfinite(sum(weights))
    assert max(weights) <= 4 * sorted(claims)[(len(claims) - 1) // 2]
