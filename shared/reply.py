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
"""

from __future__ import annotations

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
)

__all__ = [
    "ARRAYS", "CONFIG", "FULL_PRECISION", "METRICS", "REASONS", "SCALES", "Rejected", "decode",
    "encode", "is_coded", "node_seed",
]

# record names
ARRAYS = "arrays"
SCALES = "update-scales"
METRICS = "metrics"
CONFIG = "config"  # the server's instruction: the resolved run config (+ server-round)

# metric keys
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
SPIKE_DENSITY = "spike-density"
TRAIN_SECONDS = "train-seconds"
ENERGY_J = "energy-j"
CYCLES = "cycles"
DRAM_BYTES = "dram-bytes"
TRAIN_REQUIRED = (NUM_EXAMPLES, LOSS, ACCURACY)
TRAIN_OPTIONAL = (SPIKE_DENSITY, TRAIN_SECONDS, ENERGY_J, CYCLES, DRAM_BYTES)
EVALUATE_REQUIRED = (LOSS, ACCURACY, NUM_EXAMPLES)

# why a reply is refused (`Rejected.reason`); counted per reason in logs, summary and Prometheus
REASONS = (
    "metrics",  # MetricRecord missing, or a required metric missing or not a finite number
    "names",  # records or tensor names other than expected
    "malformed",  # an array whose bytes do not deserialize
    "dtype",  # float32 weights / uint8 codes expected
    "shape",  # tensor shape or packed code length
    "range",  # integer codes outside -q..q
    "encoding",  # a scale that is not a power of two
    "non-finite",  # NaN or inf in weights, scales or decoded result
    "norm",  # update L2 norm above max-update-norm
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
