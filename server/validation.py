"""Reply validation: the one place the server checks what a client sent, train and evaluate, before
any Flower strategy sees it. The contract itself (record names and kinds, metric keys and bounds,
value bounds, sizes) is declared in `shared.reply`; this module enforces it on Flower's records.

A train reply is checked in this order, and the first violation raises `Rejected(reason, ...)`:

1. size: `content_bytes` at most `reply.max_reply_bytes` of the round's model and update-bits,
   before any array is deserialized ("size");
2. records: exactly "arrays" (ArrayRecord) and "metrics" (MetricRecord), plus "update-scales"
   (ConfigRecord) when update-bits < 32; a missing or extra record is "names", a record of the
   wrong kind "type";
3. metrics: `TRAIN_REQUIRED` present, no key outside `TRAIN_OPTIONAL`; every value a number (a
   list or bool is "type") within `reply.METRIC_BOUNDS` ("metrics");
4. tensors: exactly the global model's names (scales: exactly the coded tensors' names); each
   array's npy header names the expected dtype and shape before it is loaded ("dtype", "shape",
   "malformed");
5. decoding (`reply.decode`): codes in range, scales finite powers of two with exponents in range
   ("range", "encoding", "non-finite", "bounds");
6. the update's L2 norm at most `max-update-norm` when set ("norm"); every tensor of global +
   update within `reply.value_bound` and no value moved by more than `reply.MAX_STEP` ("bounds").

An evaluate reply goes through steps 1-3 with `EVALUATE_RECORDS` / `EVALUATE_REQUIRED`
(num-examples may be 0).

Weight cannot be bought: Flower weighs a reply by its claimed `num-examples`. A claim is at most
`reply.MAX_EXAMPLES` (else the reply is refused), and the weight a strategy sees is
`capped_weights`: min(claim, `WEIGHT_SPREAD` x the lower median claim of the round's accepted
replies). So a client among honest ones weighs at most what an honest client with `WEIGHT_SPREAD`
times the typical share would (honest Dirichlet(0.5) partitions: largest / median < 2), every
weight is at least 1 and their sum at most n * 2**31: no claims zero or overflow the weights.

`unusable` checks an aggregate with the same value bounds (and the per-round step against the
global model sent), so a round whose aggregate would break them keeps the last good model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared import reply
from shared.errors import Rejected
from shared.quant.update import packed_size
from shared.reply import FULL_PRECISION, REASONS, SCALES, is_coded

__all__ = [
    "REASONS", "WEIGHT_SPREAD", "Rejected", "accept", "accept_evaluate", "as_flower_reply",
    "capped_weights", "content_bytes", "unusable",
]
REQUIRED_METRICS = reply.TRAIN_REQUIRED
WEIGHT_SPREAD = 4.0  # no reply weighs more than this many times the round's median claim
RECORD_TYPES = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}
NPY_MAX_HEADER = 10_000  # bytes of npy header read before an array is loaded


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value) + reply.SCALAR_BYTES
    return reply.SCALAR_BYTES


def content_bytes(content: RecordDict) -> int:
    """Bytes a reply occupies: names, array data and metadata, config and metric values."""
    total = 0
    for name, record in content.items():
        total += len(name)
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                total += len(key) + len(array.data) + len(array.dtype) + len(array.stype)
                total += reply.SCALAR_BYTES * len(array.shape)
        else:
            for key, value in record.items():
                total += len(key) + _value_bytes(value)
    return total


def check_size(content: RecordDict, shapes: Mapping[str, tuple[int, ...]], bits: int) -> None:
    size, limit = content_bytes(content), reply.max_reply_bytes(shapes, bits)
    if size > limit:
        raise Rejected("size", f"{size} bytes, at most {limit} expected")


def check_records(content: RecordDict, declared: Mapping[str, str]) -> None:
    """Exactly the `declared` records (name -> kind), each of its kind."""
    for name, record in content.items():
        kind = declared.get(name)
        if kind is None:
            raise Rejected("names", f"unexpected record {name!r}; expected {sorted(declared)}")
        if not isinstance(record, RECORD_TYPES[kind]):
            raise Rejected("type", f"record {name!r} is a {type(record).__name__}, "
                           f"expected a {RECORD_TYPES[kind].__name__}")
    missing = sorted(set(declared) - set(content.keys()))
    if missing:
        raise Rejected("metrics" if reply.METRICS in missing else "names",
                       f"records {missing} missing")


def check_number(key: str, value: object, low: float, high: float) -> float:
    """A metric value: a finite int or float in [low, high] (compared exactly: no overflow)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("type", f"'{key}' is a {type(value).__name__}, expected a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected("metrics", f"'{key}' is {value}")
    if not low <= value <= high:
        shown = f"{value:.4g}" if isinstance(value, float) or abs(value) < 10**15 else "huge"
        raise Rejected("metrics", f"'{key}' is {shown}, allowed {low:g}..{high:g}")
    return float(value)


def check_metrics(
    record: MetricRecord, required: Sequence[str], optional: Sequence[str] = (),
    *, min_examples: int = 1,
) -> float:
    """Required keys present, none unknown, each value in bounds; returns num-examples."""
    keys = set(record.keys())
    missing, unknown = sorted(set(required) - keys), sorted(keys - {*required, *optional})
    if missing or unknown:
        raise Rejected("metrics", f"metrics missing {missing}, unknown {unknown[:5]}")
    for key in sorted(keys):
        low, high = reply.METRIC_BOUNDS[key]
        if key == reply.NUM_EXAMPLES:
            low = min_examples
        check_number(key, record[key], low, high)
    return float(record[reply.NUM_EXAMPLES])


def declared_records(bits: int) -> dict[str, str]:
    return {**reply.TRAIN_RECORDS, **(reply.SCALED_RECORDS if bits != FULL_PRECISION else {})}


def check_names(content: RecordDict, bits: int, names: set[str]) -> None:
    arrays = set(content[reply.ARRAYS].keys())
    if arrays != names:
        missing, extra = sorted(names - arrays), sorted(arrays - names)
        raise Rejected("names", f"tensors missing {missing[:5]}, unexpected {extra[:5]}")
    coded = {name for name in names if is_coded(name)}
    if bits != FULL_PRECISION and set(content[SCALES].keys()) != coded:
        raise Rejected("names", "update-scales does not name exactly the coded tensors")


def wire_format(name: str, shape: tuple[int, ...], bits: int) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) tensor `name` travels as: packed uint8 codes, or float32 of its shape."""
    if bits != FULL_PRECISION and is_coded(name):
        return np.dtype(np.uint8), (packed_size(math.prod(shape), bits),)
    return np.dtype(np.float32), tuple(shape)


def load_array(array: Array, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array's numpy value, once its npy header names `dtype` and `shape` (so a forged header
    cannot make numpy allocate more than the size check allowed)."""
    if array.stype != "numpy.ndarray":
        raise Rejected("malformed", f"{name}: serialized as {array.stype[:40]!r}")
    buffer = BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        found_shape, _, found_dtype = read_header(buffer, max_header_size=NPY_MAX_HEADER)
    except Exception as err:  # a hostile payload: any failure to parse is a rejection
        raise Rejected("malformed", f"{name}: npy header ({type(err).__name__})") from None
    if found_dtype != dtype:
        raise Rejected("dtype", f"{name}: {found_dtype}, expected {dtype}")
    if tuple(found_shape) != shape:
        raise Rejected("shape", f"{name}: {list(found_shape)}, expected {list(shape)}")
    try:
        value = np.load(BytesIO(array.data), allow_pickle=False)
    except Exception as err:
        raise Rejected("malformed", f"{name}: {type(err).__name__}") from None
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
        raise Rejected("malformed", f"{name}: does not load as its header says")
    return value


def decode_delta(
    content: RecordDict, global_arrays: Mapping[str, np.ndarray], bits: int
) -> dict[str, np.ndarray]:
    """The reply's update (weights minus the global weights), as float32 arrays."""
    record = content[reply.ARRAYS]
    arrays = {name: load_array(record[name], name, *wire_format(name, base.shape, bits))
              for name, base in global_arrays.items()}
    scales = dict(content[SCALES]) if bits != FULL_PRECISION else None
    return reply.decode(arrays, scales, global_arrays, bits)


def update_norm(deltas: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the whole update (all tensors as one vector), in float64."""
    return math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in deltas.values()))


def accept(
    content: RecordDict,
    global_arrays: Mapping[str, np.ndarray],
    *,
    bits: int,
    max_norm: float = 0.0,
) -> ArrayRecord:
    """Validate one train reply against the global weights it was sent; returns its full float32
    weights (global + update) or raises `Rejected`."""
    shapes = {name: tuple(base.shape) for name, base in global_arrays.items()}
    check_size(content, shapes, bits)
    check_records(content, declared_records(bits))
    check_metrics(content[reply.METRICS], reply.TRAIN_REQUIRED, reply.TRAIN_OPTIONAL)
    check_names(content, bits, set(global_arrays))
    deltas = decode_delta(content, global_arrays, bits)
    norm = update_norm(deltas)
    if not math.isfinite(norm):
        raise Rejected("non-finite", f"update norm is {norm}")
    if max_norm > 0 and norm > max_norm:
        raise Rejected("norm", f"update norm {norm:.4g} > max-update-norm {max_norm:g}")
    weights = {}
    for name, base in global_arrays.items():
        full = base + deltas[name]
        if not np.isfinite(full).all():
            raise Rejected("non-finite", f"{name} overflows when applied")
        reply.check_bounds(name, full, deltas[name])
        weights[name] = Array(np.ascontiguousarray(full, dtype=np.float32))
    return ArrayRecord(weights)


def accept_evaluate(content: RecordDict) -> float:
    """Validate one evaluate reply; returns the examples it claims (0 allowed: an empty test
    share) or raises `Rejected`."""
    check_size(content, {}, FULL_PRECISION)
    check_records(content, reply.EVALUATE_RECORDS)
    return check_metrics(content[reply.METRICS], reply.EVALUATE_REQUIRED, min_examples=0)


def capped_weights(claims: Sequence[float]) -> list[float]:
    """Aggregation weights for the claimed example counts of a round's accepted replies: each
    claim capped at `WEIGHT_SPREAD` times the lower median claim (claims are >= 1 and at most
    `reply.MAX_EXAMPLES`, so the weights are positive and their sum finite)."""
    if not claims:
        return []
    ordered = sorted(claims)
    cap = WEIGHT_SPREAD * ordered[(len(ordered) - 1) // 2]
    return [min(float(claim), cap) for claim in claims]


def as_flower_reply(
    content: RecordDict, weights: ArrayRecord | None, metric_keys: set[str],
    num_examples: float | None = None,
) -> None:
    """Rewrite an accepted reply in place into what Flower's strategies expect: the full weights
    as its one ArrayRecord (train replies), a MetricRecord holding `metric_keys` (the keys every
    accepted reply of the round has, so Flower's consistency check holds) and, when given, the
    capped `num_examples` as its weight."""
    metrics = content[reply.METRICS]
    for key in list(content.keys()):
        del content[key]
    if weights is not None:
        content[reply.ARRAYS] = weights
    values = {k: metrics[k] for k in metrics if k in metric_keys}
    if num_examples is not None:
        values[reply.NUM_EXAMPLES] = num_examples
    content[reply.METRICS] = MetricRecord(values)


def unusable(
    arrays: ArrayRecord, previous: Mapping[str, np.ndarray] | None = None
) -> str | None:
    """Why an aggregated global model cannot be used (None if it can): a non-finite value, a value
    outside `reply.value_bound` (negative or vanishing BN variances, huge weights) or, given the
    `previous` global weights, a value moved by more than `reply.MAX_STEP` in the round. Each
    update was valid, but a strategy can still combine them into a broken model (FedAdam's server
    step, DP noise, boosted updates)."""
    try:
        for name, array in arrays.items():
            value = array.numpy()
            if not np.isfinite(value).all():
                return f"{name} is not finite"
            if name.endswith("running_var") and (value < 0).any():
                return f"{name} has negative variances"
            base = None if previous is None else previous.get(name)
            if previous is not None and (base is None or base.size != value.size):
                return f"{name} does not match the global model"
            if base is not None:  # Flower's aggregation may return a 0-d tensor as shape (1,)
                value = value.reshape(base.shape)
            delta = None if base is None else value.astype(np.float64) - base
            reply.check_bounds(name, value, delta)
        if previous is not None and set(arrays.keys()) != set(previous):
            return "tensors differ from the global model's"
    except Rejected as err:
        return err.detail
    return None
