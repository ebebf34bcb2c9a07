"""`client.hostile:app`: the honest ClientApp behind a mod that makes chosen nodes send replies
that break the reply contract (`shared.reply`), to show that no reply can end a run or take over
the global model (`server.validation`).

For testing the server only. Nodes with partition-id < `nodes` (`hostile_app(nodes)`; the module's
`app` has one such node, partition 0) train honestly, then rewrite their reply by one of `SHAPES`,
the next ones each round (`shape_for`): every record-kind swap,
missing, extra and duplicated records and keys, wrong dtypes and shapes, empty and oversized
arrays, NaN / inf / huge / negative values, lists where scalars belong, forged npy headers, and
example counts that try to buy weight. Their evaluate replies go through `EVALUATE_SHAPES` the
same way. Every other node stays honest.

`mutate(content, bits, pick)` draws a random hostile rewrite from the same primitives, with
`pick(options)` choosing each detail: `random.Random.choice` for the bench
(`bench/hostile_replies.py`), a hypothesis draw for the fuzzer (tests/server/test_reply_fuzz.py).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client import app as honest
from shared import reply

log = logging.getLogger("spikefed")
Pick = Callable[[Sequence[Any]], Any]
Shape = Callable[[RecordDict, int], None]

# values no honest client sends, for metrics and scales (lists where scalars belong too)
HOSTILE_NUMBERS = (math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7e308, -1.0, -5, 0, 0.0,
                   2.0**100, 2.0**-100, 1e-30, 10**400, 2**63, 1e6, 1.5, 3)
HOSTILE_LISTS = ([1.0, 2.0], [], [math.nan], [10**400], [1, 2, 3])
HOSTILE_CONFIG = ("x" * 100, b"\x00" * 16, True, "0.5", "x" * 200_000)
RECORD_KINDS = ("array", "config", "metric")
EXTRA_NAMES = (reply.ARRAYS, reply.SCALES, reply.METRICS, "metrics-2", "config", "x")


def _record(kind: str, source: Any = None) -> ArrayRecord | ConfigRecord | MetricRecord:
    """A record of `kind`, holding what can be carried over from `source` (another record)."""
    if kind == "array":
        if isinstance(source, ArrayRecord):
            return ArrayRecord(dict(source.items()))
        return ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    items = {} if source is None or isinstance(source, ArrayRecord) else dict(source.items())
    if kind == "config":
        return ConfigRecord(items or {"num-examples": 10, "loss": 1.0})
    numbers = {k: v for k, v in items.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return MetricRecord(numbers or {"num-examples": 10, "loss": 1.0, "accuracy": 0.5})


def hostile_array(value: np.ndarray, pick: Pick) -> Array:
    """A replacement for one tensor's honest wire `value`."""
    kind = pick(("float64", "int8", "float16", "big-endian", "uint8", "longer", "2d", "empty",
                 "oversized", "nan", "inf", "huge", "codes-255", "garbage", "forged-header",
                 "scalar", "bool"))
    flat = value.reshape(-1)
    match kind:
        case "float64" | "int8" | "float16" | "uint8" | "bool":
            with np.errstate(all="ignore"):  # NaN or 1e30 cast to int8: garbage is the point
                return Array(value.astype(kind))
        case "big-endian":
            return Array(value.astype(value.dtype.newbyteorder(">")))
        case "longer":
            return Array(np.append(flat, flat[:1] if flat.size else np.zeros(1, value.dtype)))
        case "2d":
            return Array(flat.reshape(1, -1))
        case "empty":
            return Array(np.zeros(0, value.dtype))
        case "oversized":
            return Array(np.zeros(flat.size * 3 + 70_000, value.dtype))
        case "nan" | "inf" | "huge":
            fill = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[kind]
            return Array(np.full(value.shape, fill, np.float32))
        case "codes-255":
            return Array(np.full(value.shape, 255, np.uint8))
        case "garbage":
            return Array(dtype=str(value.dtype), shape=value.shape, stype="numpy.ndarray",
                         data=b"junk" * (1 + flat.size // 4))
        case "forged-header":
            out = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                out, {"descr": value.dtype.str, "fortran_order": False, "shape": (10**12,)})
            return Array(dtype=str(value.dtype), shape=value.shape, stype="numpy.ndarray",
                         data=out.getvalue() + b"\x00" * 8)
    return Array(np.array(1.0, dtype=np.float32))  # a 0-d array


def _set(record: Any, key: str, value: Any) -> bool:
    try:
        record[key] = value
    except (TypeError, ValueError):  # a value this record kind cannot hold (nor carry on the wire)
        return False
    return True


def mutate(content: RecordDict, bits: int, pick: Pick) -> list[str]:
    """Rewrite an honest reply `content` in place by 1-3 hostile changes chosen with `pick`;
    returns what was done (empty if nothing applied)."""
    done: list[str] = []
    for _ in range(pick((1, 1, 2, 3))):
        names = list(content.keys())
        op = pick(("swap", "drop-record", "extra-record", "duplicate", "drop-key", "extra-key",
                   "metric", "metric-list", "scale", "array", "array", "claim"))
        name = pick(names) if names else None
        record = content[name] if name is not None else None
        if op == "swap" and name is not None:
            kind = pick([k for k in RECORD_KINDS if not isinstance(record, _KINDS[k])])
            content[name] = _record(kind, record)
        elif op == "drop-record" and name is not None:
            del content[name]
        elif op == "extra-record":
            name = pick([n for n in EXTRA_NAMES if n not in names] or ["x"])
            content[name] = _record(pick(RECORD_KINDS))
        elif op == "duplicate" and name is not None:
            name = f"{name}-copy"
            content[name] = _record(_kind(record), record)
        elif op == "drop-key" and record is not None and len(record):
            key = pick(sorted(record.keys()))
            del record[key]
            name = f"{name}[{key}]"
        elif op == "extra-key" and record is not None:
            key = pick(("extra", reply.ENERGY_J, reply.CYCLES, "fc.bias2"))
            value = Array(np.zeros(2, np.float32)) if isinstance(record, ArrayRecord) else 1.0
            if not _set(record, key, value):
                continue
            name = f"{name}[{key}]"
        elif op in ("metric", "metric-list", "claim"):
            metrics = content.get(reply.METRICS)
            if not isinstance(metrics, MetricRecord):
                continue
            key = reply.NUM_EXAMPLES if op == "claim" else pick(sorted(reply.METRIC_BOUNDS))
            value = pick(HOSTILE_LISTS if op == "metric-list" else
                         (1e308, 1e6, 2**31 - 1, 2**31, 10**400, 0, -1) if op == "claim"
                         else HOSTILE_NUMBERS)
            if not _set(metrics, key, value):
                continue
            name = f"metrics[{key}]={value!r:.20}"
        elif op == "scale":
            scales = content.get(reply.SCALES)
            if not isinstance(scales, ConfigRecord) or not len(scales):
                continue
            key = pick(sorted(scales.keys()))
            value = pick((*HOSTILE_NUMBERS, *HOSTILE_LISTS, *HOSTILE_CONFIG))
            if not _set(scales, key, value):
                continue
            name = f"update-scales[{key}]={value!r:.20}"
        elif op == "array":
            arrays = content.get(reply.ARRAYS)
            if not isinstance(arrays, ArrayRecord) or not len(arrays):
                continue
            key = pick(sorted(arrays.keys()))
            try:
                value = arrays[key].numpy()
            except Exception:  # an earlier change left no honest array there to start from
                value = np.zeros(4, np.float32)
            if not isinstance(value, np.ndarray):
                value = np.zeros(4, np.float32)
            arrays[key] = hostile_array(value, pick)
            name = f"arrays[{key}]"
        else:
            continue
        done.append(f"{op} {name}")
    return done


_KINDS = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


def _kind(record: Any) -> str:
    return next(k for k, cls in _KINDS.items() if isinstance(record, cls))


# -- the fixed shapes the mod sends in turn ------------------------------------------------------
def _first(record: Any) -> str:
    return sorted(record.keys())[0]


def _replace_array(how: str) -> Shape:
    def shape(content: RecordDict, bits: int) -> None:
        arrays = content[reply.ARRAYS]
        key = _first(arrays)
        arrays[key] = hostile_array(arrays[key].numpy(), lambda options: how)
    return shape


def _set_metric(key: str, value: Any) -> Shape:
    def shape(content: RecordDict, bits: int) -> None:
        content[reply.METRICS][key] = value
    return shape


def _set_scale(value: Any) -> Shape:
    def shape(content: RecordDict, bits: int) -> None:
        scales = content.get(reply.SCALES)
        if isinstance(scales, ConfigRecord):
            scales[_first(scales)] = value
        else:  # update-bits 32: the same intent on the weights
            _replace_array("huge")(content, bits)
    return shape


def _swap(name: str, kind: str) -> Shape:
    def shape(content: RecordDict, bits: int) -> None:
        content[name] = _record(kind, content.get(name))
    return shape


def _drop(name: str, key: str | None = None) -> Shape:
    def shape(content: RecordDict, bits: int) -> None:
        if key is None:
            del content[name]
        else:
            del content[name][key]
    return shape


def _low_variance(content: RecordDict, bits: int) -> None:
    arrays = content[reply.ARRAYS]
    for key in arrays.keys():
        if key.endswith("running_var"):
            value = arrays[key].numpy()
            # update-bits < 32 carry a delta against a variance the node does not know here:
            # -1e3 drives any variance far below the floor
            arrays[key] = Array(np.full(value.shape, 1e-30 if bits == 32 else -1e3, np.float32))
            return
    _replace_array("nan")(content, bits)


SHAPES: dict[str, Shape] = {
    "arrays as a ConfigRecord": _swap(reply.ARRAYS, "config"),
    "update-scales as an ArrayRecord": _swap(reply.SCALES, "array"),
    "metrics as a ConfigRecord": _swap(reply.METRICS, "config"),
    "no metrics": _drop(reply.METRICS),
    "no arrays": _drop(reply.ARRAYS),
    "two MetricRecords": lambda c, b: c.__setitem__("metrics-2", MetricRecord({"loss": 1.0})),
    "extra ConfigRecord": lambda c, b: c.__setitem__("config", ConfigRecord({"x": 1})),
    "num-examples missing": _drop(reply.METRICS, reply.NUM_EXAMPLES),
    "unknown metric": _set_metric("bonus", 1.0),
    "energy-j as a list": _set_metric(reply.ENERGY_J, [0.1, 0.2]),
    "cycles as a list": _set_metric(reply.CYCLES, [1, 2]),
    "spike-density as a list": _set_metric(reply.SPIKE_DENSITY, [0.1]),
    "negative energy-j": _set_metric(reply.ENERGY_J, -1.0),
    "negative cycles": _set_metric(reply.CYCLES, -5),
    "cycles 1.7e308": _set_metric(reply.CYCLES, 1.7e308),
    "loss NaN": _set_metric(reply.LOSS, math.nan),
    "claims 1e308 examples": _set_metric(reply.NUM_EXAMPLES, 1e308),
    "claims 1e6 examples": _set_metric(reply.NUM_EXAMPLES, 1_000_000),  # accepted, capped
    "claims 0 examples": _set_metric(reply.NUM_EXAMPLES, 0),
    "float64 tensor": _replace_array("float64"),
    "wrong shape": _replace_array("2d"),
    "empty tensor": _replace_array("empty"),
    "oversized tensor": _replace_array("oversized"),
    "NaN tensor": _replace_array("nan"),
    "huge tensor": _replace_array("huge"),
    "garbage bytes": _replace_array("garbage"),
    "forged npy header": _replace_array("forged-header"),
    "scale 2**100": _set_scale(2.0**100),
    "scale inf": _set_scale(math.inf),
    "scale as a string": _set_scale("0.5"),
    "running variance 1e-30": _low_variance,
}

EVALUATE_SHAPES: dict[str, Shape] = {
    "extra key": _set_metric("bonus", 1.0),
    "missing key": _drop(reply.METRICS, reply.LOSS),
    "num-examples as a list": _set_metric(reply.NUM_EXAMPLES, [10, 10]),
    "two MetricRecords": lambda c, b: c.__setitem__("metrics-2", MetricRecord({"loss": 1.0})),
    "zero examples": _set_metric(reply.NUM_EXAMPLES, 0),  # accepted, left out
    "claims 1e308 examples": _set_metric(reply.NUM_EXAMPLES, 1e308),
    "metrics as a ConfigRecord": _swap(reply.METRICS, "config"),
    "accuracy 7": _set_metric(reply.ACCURACY, 7.0),
}


def shape_for(shapes: dict[str, Shape], server_round: int, partition_id: int, nodes: int) -> str:
    """The shape hostile node `partition_id` (of `nodes`) sends in `server_round` (from 1): the
    nodes take consecutive shapes, so R rounds cover R x nodes of them."""
    names = list(shapes)
    return names[((server_round - 1) * nodes + partition_id) % len(names)]


def hostile_app(nodes: int = 1) -> ClientApp:
    """The honest ClientApp whose nodes with partition-id < `nodes` send hostile replies."""

    def hostile_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        answer = call_next(msg, context)
        partition_id = int(context.node_config.get("partition-id", -1))
        if answer.has_error() or not 0 <= partition_id < nodes or reply.CONFIG not in msg.content:
            return answer
        config = msg.content[reply.CONFIG]
        server_round = int(config.get("server-round", 0))
        bits = int(config.get("update-bits", reply.FULL_PRECISION))
        train = msg.metadata.message_type == MessageType.TRAIN
        shapes = SHAPES if train else EVALUATE_SHAPES
        name = shape_for(shapes, server_round, partition_id, nodes)
        shapes[name](answer.content, bits)
        log.info("hostile node %d, round %d: sends %s", partition_id, server_round, name)
        return answer

    app = ClientApp(mods=[hostile_mod])
    app.train()(honest.train)
    app.evaluate()(honest.evaluate)
    return app


app = hostile_app(1)
