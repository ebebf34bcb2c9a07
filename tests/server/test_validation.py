"""server.validation and the strategies' use of it: every rule refuses its case, a good update
passes, rejected updates are counted and left out, too few valid updates leave the model as is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)
from support import reply

from server.strategy import make_strategy, privacy_summary, reply_bytes
from server.validation import Rejected, accept
from shared.config import RunConfig
from shared.quant.update import EncodedTensor, encode_update

GLOBAL = {"conv.weight": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
          "bn.running_var": np.ones(2, dtype=np.float32),
          "fc.bias": np.zeros(5, dtype=np.float32)}


def metrics(**changes) -> MetricRecord:
    values = {"loss": 1.0, "accuracy": 0.5, "num-examples": 10, "energy-j": 0.5}
    values.update(changes)
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def content(delta: float | dict = 0.01, bits: int = 8, seed: int = 0) -> RecordDict:
    """A train reply's content: GLOBAL + `delta` (a constant plus a little noise, or per tensor)."""
    rng = np.random.default_rng(seed)
    new = {}
    for name, base in GLOBAL.items():
        noise = 1e-3 * rng.standard_normal(base.shape)
        d = delta[name] if isinstance(delta, dict) else delta + noise
        new[name] = torch.from_numpy((base + d).astype(np.float32))
    if bits == 32:
        return RecordDict({"arrays": ArrayRecord(new), "metrics": metrics()})
    encoded = encode_update(new, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, bits)
    coded = {k: e for k, e in encoded.items() if isinstance(e, EncodedTensor)}
    return RecordDict({
        "arrays": ArrayRecord({k: Array(coded[k].packed if k in coded else e)
                               for k, e in encoded.items()}),
        "update-scales": ConfigRecord({k: e.scale for k, e in coded.items()}),
        "metrics": metrics(),
    })


def test_a_good_compressed_update_passes_and_decodes_to_global_plus_update():
    weights = accept(content(0.01), GLOBAL, bits=8, max_norm=1.0)
    for name, base in GLOBAL.items():
        assert np.allclose(weights[name].numpy(), base + 0.01, atol=5e-3)
    weights = accept(content(0.01, bits=32), GLOBAL, bits=32)
    assert np.allclose(weights["fc.bias"].numpy(), 0.01, atol=5e-3)


def _set(body: RecordDict, record: str, key: str, value) -> RecordDict:
    body[record][key] = value
    return body


def _drop(body: RecordDict, record: str, key: str | None = None) -> RecordDict:
    if key is None:
        del body[record]
    else:
        del body[record][key]
    return body


CASES = {
    "no metrics record": (lambda: _drop(content(), "metrics"), 8, "metrics"),
    "no num-examples": (lambda: _drop(content(), "metrics", "num-examples"), 8, "metrics"),
    "loss is NaN": (lambda: _set(content(), "metrics", "loss", float("nan")), 8, "metrics"),
    "zero examples": (lambda: _set(content(), "metrics", "num-examples", 0), 8, "metrics"),
    "tensor missing": (lambda: _drop(content(), "arrays", "fc.bias"), 8, "names"),
    "extra tensor": (
        lambda: _set(content(), "arrays", "extra", Array(np.zeros(1, np.uint8))), 8, "names"),
    "scales missing": (lambda: _drop(content(), "update-scales"), 8, "names"),
    "codes not uint8": (
        lambda: _set(content(), "arrays", "fc.bias", Array(np.zeros(5, np.int8))), 8, "dtype"),
    "codes too short": (
        lambda: _set(content(), "arrays", "fc.bias", Array(np.zeros(4, np.uint8))), 8, "shape"),
    "code out of range": (
        lambda: _set(content(), "arrays", "fc.bias", Array(np.full(5, 255, np.uint8))), 8,
        "range"),
    "scale is NaN": (
        lambda: _set(content(), "update-scales", "fc.bias", float("nan")), 8, "non-finite"),
    "scale not a power of two": (
        lambda: _set(content(), "update-scales", "fc.bias", 0.3), 8, "encoding"),
    "garbage bytes": (
        lambda: _set(content(), "arrays", "fc.bias",
                     Array(dtype="uint8", shape=(5,), stype="numpy.ndarray", data=b"junk")),
        8, "malformed"),
    "float weights with NaN": (
        lambda: _set(content(bits=32), "arrays", "fc.bias",
                     Array(np.full(5, np.nan, np.float32))), 32, "non-finite"),
    "float weights wrong shape": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(np.zeros(6, np.float32))), 32,
        "shape"),
    "float64 weights": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(np.zeros(5, np.float64))), 32,
        "dtype"),
    "codes sent where weights expected": (lambda: content(bits=8), 32, "names"),
    "norm too large": (lambda: content(0.5), 8, "norm"),
    "statistics delta NaN": (
        lambda: _set(content(), "arrays", "bn.running_var", Array(np.full(2, np.nan, np.float32))),
        8, "non-finite"),
    "statistics sent as codes": (
        lambda: _set(content(), "arrays", "bn.running_var", Array(np.zeros(2, np.uint8))), 8,
        "dtype"),
    "scale for a statistics tensor": (
        lambda: _set(content(), "update-scales", "bn.running_var", 0.5), 8, "names"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_rejects_its_case(case):
    make, bits, reason = CASES[case]
    with pytest.raises(Rejected) as err:
        accept(make(), GLOBAL, bits=bits, max_norm=1.0)
    assert err.value.reason == reason, err.value
    accept(content(bits=bits), GLOBAL, bits=bits, max_norm=1.0)  # and a good one passes


def strategy_for(name: str = "fedavg", n: int = 5, **config):
    raw = {"strategy": name, "min-clients": n, "min-nodes": 2, "update-bits": 8, **config}
    strategy = make_strategy(RunConfig.parse(raw))
    sent = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    strategy.expect(sent)  # what configure_train does with the weights it sends
    if "dp-clipping-norm" in config:
        strategy.current_arrays = sent  # the DP wrapper's own record of them
    return strategy


def test_rejected_updates_are_counted_logged_and_left_out(caplog):
    strategy = strategy_for("fedavg", 3)
    bad = content(0.0)
    bad["update-scales"]["conv.weight"] = float("nan")
    replies = [reply(content(0.01, seed=1), 1), reply(bad, 2), reply(content(0.03, seed=3), 3)]
    travelled = sum(reply_bytes(m.content) for m in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["fc.bias"].numpy(), 0.02, atol=5e-3)  # mean of the two good ones
    stats = strategy.rounds[1]
    assert (stats.clients, stats.rejected, stats.rejected_reasons) == (2, 1, {"non-finite": 1})
    assert stats.bytes_up == travelled  # the rejected update travelled too
    assert stats.energy_j == pytest.approx(1.0)  # metrics of accepted updates only
    assert "node 2" in caplog.text and "non-finite" in caplog.text


def test_all_rejected_or_too_few_valid_keeps_the_model_unchanged():
    strategy = strategy_for("fedavg", 3)
    nan = [reply(content({k: np.full(v.shape, np.nan) for k, v in GLOBAL.items()}), i)
           for i in range(3)]
    assert strategy.aggregate_train(1, nan) == (None, None)
    assert strategy.rounds[1].rejected == 3 and strategy.rounds[1].clients == 0
    one_good = [reply(content(0.01), 1), reply(content(5.0), 2)]  # min-nodes=2, max norm 1
    strategy = strategy_for("fedavg", 3, **{"max-update-norm": 1.0})
    assert strategy.aggregate_train(1, one_good) == (None, None)
    assert strategy.rounds[1].rejected_reasons == {"norm": 1}


@pytest.mark.parametrize(("name", "n"), [("multikrum", 5), ("bulyan", 7), ("krum", 5),
                                         ("fedmedian", 5), ("fedtrimmedavg", 5)])
def test_robust_strategies_resist_a_valid_but_hostile_update(name, n):
    strategy = strategy_for(name, n)
    replies = [reply(content(0.01, seed=i), i + 1) for i in range(n - 1)]
    replies.append(reply(content(-0.3, seed=99), n))  # passes validation (no norm limit)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["fc.bias"].numpy(), 0.01, atol=5e-3)
    assert strategy.rounds[1].rejected == 0


def test_fedavg_follows_the_hostile_update_that_robust_ones_resist():
    strategy = strategy_for("fedavg", 5)
    replies = [reply(content(0.01, seed=i), i + 1) for i in range(4)]
    replies.append(reply(content(-0.3, seed=99), 5))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["fc.bias"].numpy(), (4 * 0.01 - 0.3) / 5, atol=5e-3)


def test_server_side_dp_clips_the_decoded_update_and_adds_noise():
    clip = 0.05
    strategy = strategy_for("fedavg", 3, **{"dp-clipping-norm": clip})
    replies = [reply(content(0.2, seed=i), i + 1) for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    update = np.concatenate([(arrays[k].numpy() - v).ravel() for k, v in GLOBAL.items()])
    assert np.linalg.norm(update) <= clip * (1 + 1e-5)  # each update clipped, so is their mean
    assert np.linalg.norm(update) > 0.9 * clip
    noisy = strategy_for("fedavg", 3, **{"dp-clipping-norm": clip, "dp-noise-multiplier": 1.0})
    replies = [reply(content(0.2, seed=i), i + 1) for i in range(3)]
    noisy_arrays, _ = noisy.aggregate_train(1, replies)
    assert not np.allclose(noisy_arrays["fc.bias"].numpy(), arrays["fc.bias"].numpy())
    privacy = privacy_summary(RunConfig.parse({"min-clients": 3, "dp-clipping-norm": clip,
                                               "dp-noise-multiplier": 1.0}))
    assert privacy["noise_stdev"] == pytest.approx(1.0 * clip / 3)
    assert privacy["num_sampled_clients"] == 3
    assert privacy_summary(RunConfig()) is None


def test_an_unusable_aggregate_of_valid_updates_keeps_the_model(caplog):
    strategy = strategy_for("fedavg", 3)
    boosted = {"conv.weight": np.zeros((2, 3, 4)), "fc.bias": np.zeros(5),
               "bn.running_var": np.full(2, -3.0)}  # each update valid, variances end up < 0
    replies = [reply(content(boosted), i + 1) for i in range(3)]
    assert strategy.aggregate_train(1, replies)[0] is None
    assert strategy.rounds[1].clients == 0 and strategy.rounds[1].rejected == 0
    assert "negative variances" in caplog.text
