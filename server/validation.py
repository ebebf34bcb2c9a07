"""Update validation: what the server checks in a train reply before any strategy aggregates it.

A reply must carry exactly the records the run's uplink format defines: "metrics" (a MetricRecord
with finite `num-examples` > 0, `loss` and `accuracy`, all its values finite) and "arrays", plus
"update-scales" when `update-bits` < 32 (see `shared.quant.update`). Every tensor of the global
model must be there under its own name, with the expected dtype and shape (float32 weights; or
packed uint8 codes of the right length, float32 deltas for BN statistics), codes within range,
scales finite powers of two, all values finite, and, when
`max-update-norm` > 0, the update's L2 norm (all tensors together) at most that. An accepted reply
is rewritten to what Flower's strategies expect: one ArrayRecord of full float32 weights (global +
decoded update). A refused one raises `Rejected` with one of `REASONS`, which the round counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from shared import reply
from shared.errors import Rejected
from shared.reply import FULL_PRECISION, REASONS, SCALES, is_coded

__all__ = ["REASONS", "Rejected", "accept", "as_flower_reply", "unusable"]
REQUIRED_METRICS = reply.TRAIN_REQUIRED


def check_metrics(content: RecordDict) -> None:
    metrics = content.metric_records
    if set(metrics) != {"metrics"}:
        raise Rejected("metrics", f"expected one MetricRecord 'metrics', got {sorted(metrics)}")
    record = metrics["metrics"]
    for key in REQUIRED_METRICS:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Rejected("metrics", f"'{key}' missing or not a number")
        if not math.isfinite(value):
            raise Rejected("metrics", f"'{key}' is {value}")
    if record["num-examples"] <= 0:
        raise Rejected("metrics", f"num-examples is {record['num-examples']}")
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise Rejected("metrics", f"'{key}' is not finite")


def check_records(content: RecordDict, bits: int, names: set[str]) -> None:
    expected = {"arrays"} | ({SCALES} if bits != FULL_PRECISION else set())
    found = set(content.array_records) | set(content.config_records)
    if found != expected:
        raise Rejected("names", f"records {sorted(found)}, expected {sorted(expected)}")
    arrays = set(content.array_records["arrays"])
    if arrays != names:
        missing, extra = sorted(names - arrays), sorted(arrays - names)
        raise Rejected("names", f"tensors missing {missing[:5]}, unexpected {extra[:5]}")
    coded = {name for name in names if is_coded(name)}
    if bits != FULL_PRECISION and set(content.config_records[SCALES]) != coded:
        raise Rejected("names", "update-scales does not name exactly the coded tensors")


def _numpy(array: Array, name: str) -> np.ndarray:
    try:
        return array.numpy()
    except Exception as err:  # a hostile payload: any failure to load is a rejection
        raise Rejected("malformed", f"{name}: {type(err).__name__}") from None


def decode_delta(
    content: RecordDict, global_arrays: Mapping[str, np.ndarray], bits: int
) -> dict[str, np.ndarray]:
    """The reply's update (weights minus the global weights), as float32 arrays."""
    record = content.array_records[reply.ARRAYS]
    arrays = {name: _numpy(record[name], name) for name in global_arrays}
    scales = dict(content.config_records[SCALES]) if bits != FULL_PRECISION else None
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
    check_metrics(content)
    check_records(content, bits, set(global_arrays))
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
        weights[name] = Array(np.ascontiguousarray(full, dtype=np.float32))
    return ArrayRecord(weights)


def as_flower_reply(content: RecordDict, weights: ArrayRecord, metric_keys: set[str]) -> None:
    """Rewrite an accepted reply in place into what Flower's strategies expect: the full weights
    as its one ArrayRecord and a MetricRecord holding `metric_keys` (the keys every accepted reply
    of the round has, so Flower's consistency check holds)."""
    metrics = content.metric_records["metrics"]
    for key in list(content.config_records):
        del content[key]
    content["arrays"] = weights
    content["metrics"] = MetricRecord({k: metrics[k] for k in metrics if k in metric_keys})



def unusable(arrays: ArrayRecord) -> str | None:
    """Why an aggregated global model cannot be used (None if it can): a non-finite value, or a
    negative BatchNorm running variance. Each update was valid, but a non-robust strategy can
    still combine hostile ones (a boosted update under FedAvg) into a broken model."""
    for name, array in arrays.items():
        value = array.numpy()
        if not np.isfinite(value).all():
            return f"{name} is not finite"
        if name.endswith("running_var") and (value < 0).any():
            return f"{name} has negative variances"
    return None
