"""server.validation and the strategies' use of it: every rule refuses its case, a good update
passes, rejected updates are counted and left out, too few valid updates leave the model as is,
evaluate replies are validated, claimed example counts cannot buy weight. The hypothesis fuzzer
over all of it is test_reply_fuzz.py."""

from __future__ import annotations

import io
import zipfile

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
from server.validation import Rejected, accept, accept_evaluate, capped_weights, unusable
from shared import reply as contract
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
    # record kinds: a swap is refused by type, never indexed
    "arrays as a ConfigRecord": (
        lambda: _set_record(content(), "arrays", ConfigRecord({"fc.bias": 1.0})), 8, "type"),
    "scales as an ArrayRecord": (
        lambda: _set_record(content(), "update-scales",
                            ArrayRecord({"fc.bias": Array(np.zeros(1, np.float32))})), 8, "type"),
    "metrics as a ConfigRecord": (
        lambda: _set_record(content(), "metrics", ConfigRecord({"num-examples": 10})), 8, "type"),
    "two MetricRecords": (
        lambda: _set_record(content(), "metrics-2", metrics()), 8, "names"),
    "an extra ConfigRecord at 32 bits": (
        lambda: _set_record(content(bits=32), "config", ConfigRecord({"x": 1})), 32, "names"),
    # metric values: scalars where scalars belong, in bounds
    "energy as a list": (lambda: _set(content(), "metrics", "energy-j", [0.1, 0.2]), 8, "type"),
    "num-examples as a list": (
        lambda: _set(content(), "metrics", "num-examples", [10, 10]), 8, "type"),
    "negative energy": (lambda: _set(content(), "metrics", "energy-j", -1.0), 8, "metrics"),
    "huge cycles": (lambda: _set(content(), "metrics", "cycles", 1.7e308), 8, "metrics"),
    "cycles beyond float": (lambda: _set(content(), "metrics", "cycles", 10**400), 8, "metrics"),
    "accuracy above 1": (lambda: _set(content(), "metrics", "accuracy", 1.5), 8, "metrics"),
    "unknown metric": (lambda: _set(content(), "metrics", "bonus", 1.0), 8, "metrics"),
    "claims 1e308 examples": (
        lambda: _set(content(), "metrics", "num-examples", 1e308), 8, "metrics"),
    # size before decoding, forged headers
    "oversized array": (
        lambda: _set(content(), "arrays", "fc.bias", Array(np.zeros(100_000, np.uint8))), 8,
        "size"),
    "huge string scale": (
        lambda: _set(content(), "update-scales", "fc.bias", "x" * 200_000), 8, "size"),
    "header claims a huge shape": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(
            dtype="float32", shape=(5,), stype="numpy.ndarray", data=_npy_header((10**12,)))),
        32, "shape"),
    "an npz archive": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(
            dtype="float32", shape=(5,), stype="numpy.ndarray", data=_npz())), 32, "malformed"),
    "big-endian floats": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(np.zeros(5, ">f4"))), 32,
        "dtype"),
    # values: bounded by the model and the quantizer
    "scale 2**100": (lambda: _set(content(), "update-scales", "fc.bias", 2.0**100), 8, "bounds"),
    "scale beyond float": (
        lambda: _set(content(), "update-scales", "fc.bias", 2**2000), 8, "bounds"),
    "weights of 1e30": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(np.full(5, 1e30, np.float32))),
        32, "bounds"),
    "a weight moved by 20 in one round": (
        lambda: _set(content(bits=32), "arrays", "fc.bias", Array(np.full(5, 20, np.float32))),
        32, "bounds"),
    "running variance 1e-30": (
        lambda: content({"conv.weight": 0.0, "fc.bias": 0.0,
                         "bn.running_var": np.full(2, 1e-30 - 1.0)}), 8, "bounds"),
}


def _set_record(body: RecordDict, name: str, record) -> RecordDict:
    body[name] = record
    return body


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """An npy file whose header announces `shape` float32 values, with 8 bytes of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue() + b"\0" * 8


def _npz() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a.npy", b"junk")
    return out.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_rejects_its_case(case):
    make, bits, reason = CASES[case]
    max_norm = 0.0 if reason == "bounds" else 1.0  # value bounds hold with no norm limit
    with pytest.raises(Rejected) as err:
        accept(make(), GLOBAL, bits=bits, max_norm=max_norm)
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
    # each update is valid, but DP noise of stdev 1000 * 0.05 / 3 moves weights beyond MAX_STEP
    strategy = strategy_for("fedavg", 3, **{"dp-clipping-norm": 0.05,
                                            "dp-noise-multiplier": 1000.0})
    replies = [reply(content(0.01, seed=i), i + 1) for i in range(3)]
    assert strategy.aggregate_train(1, replies)[0] is None
    assert strategy.rounds[1].clients == 0 and strategy.rounds[1].rejected == 0
    assert "moved by" in caplog.text and "largest changes of" in caplog.text
    assert "node 1" in caplog.text  # the replies are named


def test_unusable_names_non_finite_negative_huge_and_jumping_models():
    def record(**values):
        return ArrayRecord({k: Array(np.asarray(values.get(k, v), np.float32))
                            for k, v in GLOBAL.items()})

    assert unusable(record()) is None and unusable(record(), GLOBAL) is None
    assert "not finite" in unusable(record(**{"fc.bias": np.full(5, np.nan)}))
    assert "negative" in unusable(record(**{"bn.running_var": np.full(2, -1.0)}))
    assert "values in" in unusable(record(**{"bn.running_var": np.full(2, 1e-30)}))
    assert "values in" in unusable(record(**{"fc.bias": np.full(5, 1e4)}))
    assert "moved by" in unusable(record(**{"fc.bias": np.full(5, 17.0)}), GLOBAL)
    assert unusable(record(**{"fc.bias": np.full(5, 17.0)})) is None  # no previous: no step


def evaluation(**changes) -> RecordDict:
    values = {"loss": 0.5, "accuracy": 0.8, "num-examples": 100, **changes}
    return RecordDict({"metrics": MetricRecord({k: v for k, v in values.items()
                                                if v is not None})})


EVALUATE_CASES = {
    "extra key": (lambda: evaluation(spare=1.0), "metrics"),
    "missing key": (lambda: evaluation(loss=None), "metrics"),
    "list num-examples": (lambda: evaluation(**{"num-examples": [1, 2]}), "type"),
    "two MetricRecords": (lambda: _set_record(evaluation(), "more", MetricRecord({"a": 1})),
                          "names"),
    "metrics as a ConfigRecord": (
        lambda: RecordDict({"metrics": ConfigRecord({"loss": 0.5})}), "type"),
    "no records": (lambda: RecordDict(), "metrics"),
    "arrays in an evaluation": (
        lambda: _set_record(evaluation(), "arrays", ArrayRecord()), "names"),
    "negative examples": (lambda: evaluation(**{"num-examples": -5}), "metrics"),
    "NaN loss": (lambda: evaluation(loss=float("nan")), "metrics"),
    "oversized": (lambda: evaluation(loss=[0.5] * 20_000), "size"),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_each_evaluate_rule_rejects_its_case(case):
    make, reason = EVALUATE_CASES[case]
    with pytest.raises(Rejected) as err:
        accept_evaluate(make())
    assert err.value.reason == reason, err.value
    assert accept_evaluate(evaluation()) == 100 and accept_evaluate(
        evaluation(**{"num-examples": 0})) == 0


def test_bad_evaluate_replies_are_counted_and_zero_examples_do_not_crash(caplog):
    strategy = strategy_for("fedavg", 3)
    good = reply(evaluation(accuracy=0.6), 1, kind="evaluate")
    bad = [reply(make(), i + 2, kind="evaluate") for i, (make, _) in
           enumerate(EVALUATE_CASES.values())]
    metrics = strategy.aggregate_evaluate(1, [good, *bad])
    assert metrics["accuracy"] == pytest.approx(0.6)
    stats = strategy.rounds[1]
    assert stats.rejected == len(EVALUATE_CASES) and stats.client_accuracy == pytest.approx(0.6)
    assert sum(stats.rejected_reasons.values()) == stats.rejected
    assert "evaluation of node 2" in caplog.text
    empty = [reply(evaluation(**{"num-examples": 0}), i + 1, kind="evaluate") for i in range(3)]
    assert strategy.aggregate_evaluate(2, empty) is None
    huge = [reply(evaluation(accuracy=0.0, **{"num-examples": contract.MAX_EXAMPLES}), 1,
                  kind="evaluate"), reply(evaluation(accuracy=1.0), 2, kind="evaluate"),
            reply(evaluation(accuracy=1.0), 3, kind="evaluate")]
    metrics = strategy.aggregate_evaluate(3, huge)  # the big claim weighs 4 x the median
    assert metrics["accuracy"] == pytest.approx(2 / 6)


def test_an_exception_while_handling_one_reply_rejects_only_that_reply(monkeypatch, caplog):
    import server.strategy as module

    real = module.accept

    def flaky(content, *args, **kwargs):
        if content["metrics"]["loss"] == 2.0:
            raise KeyError("surprise")
        return real(content, *args, **kwargs)

    monkeypatch.setattr(module, "accept", flaky)
    strategy = strategy_for("fedavg", 3)
    odd = content(0.01)
    odd["metrics"]["loss"] = 2.0
    arrays, _ = strategy.aggregate_train(1, [reply(content(0.01), 1), reply(odd, 2),
                                             reply(content(0.01, seed=2), 3)])
    assert arrays is not None and strategy.rounds[1].rejected_reasons == {"internal": 1}
    assert "Traceback" in caplog.text and "KeyError" in caplog.text


def test_weights_are_capped_at_four_times_the_median_claim_and_never_vanish():
    assert capped_weights([800, 700, 900, 1e308]) == [800, 700, 900, 3200]
    assert capped_weights([800, 1e6]) == [800, 3200]  # the lower median of two
    assert capped_weights([]) == []
    extreme = capped_weights([1, contract.MAX_EXAMPLES, contract.MAX_EXAMPLES])
    assert all(w >= 1 for w in extreme) and np.isfinite(sum(extreme))
