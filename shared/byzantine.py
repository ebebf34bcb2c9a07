"""Byzantine updates for research on robust aggregation (simulation only).

`spikefed-run --byzantine K --byzantine-kind KIND` runs the ClientApp component
`client.byzantine:app`, which wraps the honest ClientApp: nodes with partition-id < K train
honestly, then replace their update delta (trained minus global weights, per tensor) by

    nan        every value NaN (a crashed or corrupted device)
    sign-flip  -FACTOR * delta (pushes the model back, harder than the honest clients pull it)
    scale      +FACTOR * delta (a boosted update, as in model-replacement attacks)
    random     Gaussian noise, per tensor with FACTOR times the honest update's RMS

and send it in the run's uplink format. The server tells those nodes K and the kind in the train
ConfigRecord under `NODES_KEY` / `KIND_KEY`; the wrapper removes both before the honest handler
runs, and the honest ClientApp refuses them (unknown run-config keys), so the real client code
path cannot be made to lie.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

KINDS = ("nan", "sign-flip", "scale", "random")
FACTOR = 10.0
NODES_KEY = "byzantine-nodes"
KIND_KEY = "byzantine-kind"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown byzantine kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return kind


def corrupt_delta(
    delta: Mapping[str, Tensor], kind: str, generator: torch.Generator
) -> dict[str, Tensor]:
    """The update a byzantine node of `kind` sends instead of its honest `delta`."""
    check_kind(kind)
    out = {}
    for name, d in delta.items():
        d = d.float()
        if kind == "nan":
            out[name] = torch.full_like(d, float("nan"))
        elif kind == "sign-flip":
            out[name] = -FACTOR * d
        elif kind == "scale":
            out[name] = FACTOR * d
        else:
            rms = d.square().mean().sqrt() if d.numel() else d.new_zeros(())
            noise = torch.randn(d.shape, generator=generator, dtype=d.dtype)
            out[name] = FACTOR * rms * noise
    return out
