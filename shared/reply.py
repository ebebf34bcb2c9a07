"""The reply format: what a client sends back, in one place for the client, the server and the
byzantine mod (`client.byzantine`). Plain Python and numpy: Flower's record types wrap these names
in `client.app` and `server.validation`.

A train reply is a RecordDict of

    "arrays"          ArrayRecord: with update-bits 32 the trained float32 weights; otherwise the
                      update (trained minus received weights) as packed integer codes per tensor
                      (uint8), float32 deltas for BatchNorm running statistics
    "update-scales"   ConfigRecord (update-bits < 32 only): one power-of-two scale per coded tensor
    "metrics"         MetricRecord: TRAIN_REQUIRED and any of TRAIN_OPTIONAL (numbers, no lists)

An evaluate reply holds only "metrics" with EVALUATE_REQUIRED. The codec is `shared.quant.update`.

Everything in a reply is untrusted; this module declares the whole contract the server checks
(`server.validation`), and nothing outside it is accepted:

- records: exactly `TRAIN_RECORDS` (plus `SCALED_RECORDS` when update-bits < 32) or
  `EVALUATE_RECORDS`, each of its declared kind (an "arrays" ConfigRecord is refused, not read);
- metrics: the required keys and no keys but the optional ones, each a number (never a bool or a
  list) within `METRIC_BOUNDS` (finite; counters non-negative; `num-examples` at least 1 for a
  train reply and at most `MAX_EXAMPLES`);
- size: the reply's bytes (`content_bytes`) at most `max_reply_bytes` of the expected format,
  checked before any array is deserialized;
- values: each decoded tensor changes by at most `MAX_STEP` per element per round (so an update
  scale 2**e has `MIN_EXPONENT` <= e <= `max_exponent(bits)`), weights stay within `MAX_WEIGHT`,
  BN running means within `MAX_STATISTIC`, running variances within [`VAR_FLOOR`, `MAX_STATISTIC`].

The bounds sit far outside what honest training produces (weights start below 0.4 and stay below
~5; one round of local training moves a weight by < 1 at the default lr) and far inside what breaks
float32 arithmetic, so they refuse only what a client could not have computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from shared.errors import Rejected
from shared.quant.update import (
    FULL_PRECISION,
    EncodedTensor,
    check_float,
    decode_update,
    encode_update,
    is_coded,
    packed_size,
    qmax,
)

__all__ = [
    "ARRAYS", "CONFIG", "EVALUATE_RECORDS", "FULL_PRECISION", "METRICS", "METRIC_BOUNDS",
    "REASONS", "SCALES", "TRAIN_RECORDS", "Rejected", "check_bounds", "decode", "encode",
    "expected_bytes", "is_coded", "max_exponent", "max_reply_bytes", "node_seed",
]

# record names
ARRAYS = "arrays"
SCALES = "update-scales"
METRICS = "metrics"
CONFIG = "config"  # the server's instruction: the resolved run config (+ server-round)
DEVICE = "device"  # a fleet's train instruction: the node's device (name, class, profile JSON)

# metric keys
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
SPIKE_DENSITY = "spike-density"
TRAIN_SECONDS = "train-seconds"
ENERGY_J = "energy-j"
CYCLES = "cycles"
DRAM_BYTES = "dram-bytes"
# a device with a profile (shared.fleet): its modelled round, simulated seconds and joules
DEVICE_SECONDS = "device-seconds"  # compute + transfer
DEVICE_COMPUTE_SECONDS = "device-compute-seconds"  # the chip's cycles at its clock
DEVICE_ENERGY_J = "device-energy-j"  # chip + radio
DEVICE_RADIO_J = "device-radio-j"  # radio energy of the bytes received and sent
DEVICE_METRICS = (DEVICE_SECONDS, DEVICE_COMPUTE_SECONDS, DEVICE_ENERGY_J, DEVICE_RADIO_J)
TRAIN_REQUIRED = (NUM_EXAMPLES, LOSS, ACCURACY)
TRAIN_OPTIONAL = (SPIKE_DENSITY, TRAIN_SECONDS, ENERGY_J, CYCLES, DRAM_BYTES, *DEVICE_METRICS)
EVALUATE_REQUIRED = (LOSS, ACCURACY, NUM_EXAMPLES)

# record name -> kind: "array", "config", "metric" (ArrayRecord, ConfigRecord, MetricRecord)
TRAIN_RECORDS = {ARRAYS: "array", METRICS: "metric"}
SCALED_RECORDS = {SCALES: "config"}  # added to TRAIN_RECORDS when update-bits < 32
EVALUATE_RECORDS = {METRICS: "metric"}

MAX_EXAMPLES = 2**31 - 1  # the most examples one reply may claim (a device's whole dataset)
MAX_LOSS = 1e6  # cross-entropy of a finite model is far below (ln 10 ~ 2.3 at chance)
MAX_COUNT = 10**18  # chip cycles / DRAM bytes of one client's round (a few 1e9 measured)
METRIC_BOUNDS: dict[str, tuple[float, float]] = {  # key -> (low, high), both inclusive
    NUM_EXAMPLES: (1, MAX_EXAMPLES),  # an evaluate reply may report 0 (empty test share)
    LOSS: (0.0, MAX_LOSS),
    ACCURACY: (0.0, 1.0),
    SPIKE_DENSITY: (0.0, 1.0),
    TRAIN_SECONDS: (0.0, 1e7),
    ENERGY_J: (0.0, 1e9),
    CYCLES: (0, MAX_COUNT),
    DRAM_BYTES: (0, MAX_COUNT),
    DEVICE_SECONDS: (0.0, 1e9),
    DEVICE_COMPUTE_SECONDS: (0.0, 1e9),
    DEVICE_ENERGY_J: (0.0, 1e12),
    DEVICE_RADIO_J: (0.0, 1e12),
}

# value bounds of decoded updates and of every global model the server accepts
MAX_STEP = 16.0  # largest change of one value in one round (honest: < 1)
MAX_WEIGHT = 256.0  # largest |weight| (initial < 0.4, trained < ~5)
MAX_STATISTIC = 2.0**16  # largest |running mean| and running variance
VAR_FLOOR = 2.0**-20  # smallest running variance (BatchNorm's eps is 1e-5: below it no effect)
MIN_EXPONENT = -70  # smallest update-scale exponent (an all-zero update codes as 2**-60 / q)

# size of a reply: npy header per array, bytes per scalar; slack covers metrics and keys
NPY_HEADER_BYTES = 128
SCALAR_BYTES = 8
SIZE_SLACK_BYTES = 64 * 1024

# why a reply is refused (`Rejected.reason`); counted per reason in logs, summary and Prometheus
REASONS = (
    "metrics",  # MetricRecord missing; a metric missing, unknown, non-finite or out of bounds
    "names",  # records (missing, extra) or tensor names other than expected
    "malformed",  # an array whose bytes do not deserialize
    "dtype",  # float32 weights / uint8 codes expected
    "shape",  # tensor shape or packed code length
    "range",  # integer codes outside -q..q
    "encoding",  # a scale that is not a power of two
    "non-finite",  # NaN or inf in weights, scales or decoded result
    "norm",  # update L2 norm above max-update-norm
    "type",  # a record of the wrong kind, or a metric value of the wrong type (a list, a bool)
    "size",  # more bytes than the expected format, before anything is decoded
    "bounds",  # a value beyond the model's bounds (weights, statistics, per-round step, scale)
    "internal",  # the server failed on this reply for a reason of its own (logged with traceback)
)


def node_seed(seed: int, server_round: int, node_key: int) -> int:
    """The seed of one node's training in one round (its data order, dropout of rounding...)."""
    return seed * 1_000_003 + server_round * 1_009 + node_key


def encode(
    state: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], bits: int
) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
    """(arrays, scales) of a train reply for the trained `state`, given the weights `received`
    this round; scales is None with update-bits 32 (the arrays are then the weights)."""
    if bits == FULL_PRECISION:
        return {name: t.detach().cpu().numpy() for name, t in state.items()}, None
    arrays: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for name, e in encode_update(state, received, bits).items():
        if isinstance(e, EncodedTensor):
            arrays[name], scales[name] = np.asarray(e.packed), e.scale
        else:
            arrays[name] = np.asarray(e)
    return arrays, scales


def decode(
    arrays: Mapping[str, np.ndarray],
    scales: Mapping[str, object] | None,
    received: Mapping[str, np.ndarray],
    bits: int,
) -> dict[str, np.ndarray]:
    """The update (float32 deltas against `received`, the global weights sent) that `arrays` and
    `scales` carry at `bits`; raises `Rejected` with the first problem found."""
    shapes = {name: tuple(base.shape) for name, base in received.items()}
    if bits != FULL_PRECISION:
        check_exponents(scales or {}, bits)
        return decode_update(arrays, scales or {}, shapes, bits)
    if set(arrays) != set(received):
        missing, extra = sorted(set(received) - set(arrays)), sorted(set(arrays) - set(received))
        raise Rejected("names", f"tensors missing {missing[:5]}, unexpected {extra[:5]}")
    deltas = {}
    for name, base in received.items():
        try:
            deltas[name] = check_float(arrays[name], shapes[name]) - base
        except Rejected as err:
            raise Rejected(err.reason, f"{name}: {err.detail}") from None
    return deltas


def max_exponent(bits: int) -> int:
    """The largest update-scale exponent at `bits`: codes up to q times 2**e reach `MAX_STEP`."""
    return math.ceil(math.log2(MAX_STEP / qmax(bits)))


def check_exponents(scales: Mapping[str, object], bits: int) -> None:
    """Refuse (`bounds`) a power-of-two scale whose exponent is outside
    [`MIN_EXPONENT`, `max_exponent(bits)`]; other malformed scales are left to the codec."""
    top = max_exponent(bits)
    for name, scale in scales.items():
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            continue
        try:
            value = float(scale)
        except OverflowError:
            raise Rejected("bounds", f"{name}: scale {scale} beyond float range") from None
        if not math.isfinite(value) or value <= 0:
            continue
        mantissa, exp = math.frexp(value)
        if mantissa == 0.5 and not MIN_EXPONENT <= exp - 1 <= top:
            raise Rejected("bounds", f"{name}: scale 2**{exp - 1} outside "
                           f"2**{MIN_EXPONENT}..2**{top} at {bits} bits")


def value_bound(name: str) -> tuple[float, float]:
    """(low, high) of any value of tensor `name` in a model the server accepts."""
    if name.endswith("running_var"):
        return VAR_FLOOR, MAX_STATISTIC
    if name.endswith("running_mean"):
        return -MAX_STATISTIC, MAX_STATISTIC
    return -MAX_WEIGHT, MAX_WEIGHT


def check_bounds(name: str, value: np.ndarray, delta: np.ndarray | None = None) -> None:
    """Refuse (`bounds`) tensor `name` if a value leaves `value_bound(name)` or, given the round's
    `delta`, one value moved more than `MAX_STEP` (statistics: `MAX_STATISTIC`)."""
    low, high = value_bound(name)
    if value.size and not (float(value.min()) >= low and float(value.max()) <= high):
        raise Rejected("bounds", f"{name}: values in [{float(value.min()):.4g}, "
                       f"{float(value.max()):.4g}], allowed [{low:g}, {high:g}]")
    step = MAX_STEP if is_coded(name) else MAX_STATISTIC
    if delta is not None and delta.size and not float(np.abs(delta).max()) <= step:
        raise Rejected("bounds", f"{name}: moved by {float(np.abs(delta).max()):.4g} in one "
                       f"round, allowed {step:g}")


def expected_bytes(shapes: Mapping[str, tuple[int, ...]], bits: int) -> int:
    """Bytes an honest train reply's update takes: its arrays (npy files) and its scales."""
    total = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        coded = bits != FULL_PRECISION and is_coded(name)
        total += NPY_HEADER_BYTES + (packed_size(numel, bits) + SCALAR_BYTES if coded
                                     else 4 * numel)
    return total


def max_reply_bytes(shapes: Mapping[str, tuple[int, ...]], bits: int) -> int:
    """The most bytes a train reply may take (an evaluate reply: `shapes` empty): twice the
    expected update plus `SIZE_SLACK_BYTES` for metrics and names."""
    return 2 * expected_bytes(shapes, bits) + SIZE_SLACK_BYTES
