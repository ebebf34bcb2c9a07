"""Shared by the neurocore tests: the brute-force reference counts and random input batches."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.neurocore import ChipConfig, NeuroCore


class BruteForce:
    """Per (layer, phase, time step) counts from the definitions, on the same step as the tracer:
    FP = sum conv2d(nz(x), 1), BP = sum conv2d_input(nz(dy), 1), WG = sum conv2d_weight(nz(x),
    nz(dy)) (float64), and the Linear equivalents with matrix products."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict] = []
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
        ]

    def _hook(self, name):
        def hook(module, args, out):
            call = {"name": name, "m": module, "x": args[0].detach().clone(),
                    "x_grad": args[0].requires_grad, "dy": None}
            self.calls.append(call)
            if out.requires_grad:
                out.register_hook(lambda g: call.__setitem__("dy", g.detach().clone()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def counts(self, steps: int, batch: int) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = defaultdict(int)
        for c in self.calls:
            per_row = (self._conv if isinstance(c["m"], nn.Conv2d) else self._linear)(c)
            rows = per_row["fp"].shape[0]
            assert rows in (steps * batch, batch)
            n_t = steps if rows == steps * batch else 1  # time-flattened, or a head run once
            for phase, values in per_row.items():
                for t, value in enumerate(values.view(n_t, -1).sum(1).tolist()):
                    out[(c["name"], phase, t)] += round(value)
        return dict(out)

    @staticmethod
    def _conv(c: dict) -> dict[str, torch.Tensor]:
        m, dy = c["m"], c["dy"]
        nzx = (c["x"] != 0).double()
        pad = m.padding
        if m.padding_mode != "zeros":
            nzx, pad = F.pad(nzx, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        ones = torch.ones(m.weight.shape, dtype=torch.float64)
        geo = (m.stride, pad, m.dilation, m.groups)
        out = {"fp": F.conv2d(nzx, ones, None, *geo).flatten(1).sum(1)}
        if dy is not None:
            nzg = (dy != 0).double()
            if c["x_grad"]:
                out["bp"] = torch.nn.grad.conv2d_input(nzx.shape, ones, nzg, *geo).flatten(1).sum(1)
            out["wg"] = torch.stack([
                torch.nn.grad.conv2d_weight(nzx[n:n + 1], m.weight.shape, nzg[n:n + 1], *geo).sum()
                for n in range(nzx.shape[0])
            ])
        return out

    @staticmethod
    def _linear(c: dict) -> dict[str, torch.Tensor]:
        m, dy = c["m"], c["dy"]
        nzx = (c["x"] != 0).double().reshape(-1, m.weight.shape[1])
        ones = torch.ones(m.weight.shape, dtype=torch.float64)
        out = {"fp": (nzx @ ones.T).sum(1)}
        if dy is not None:
            nzg = (dy != 0).double().reshape(nzx.shape[0], -1)
            if c["x_grad"]:
                out["bp"] = (nzg @ ones).sum(1)
            out["wg"] = (nzg[:, :, None] * nzx[:, None, :]).flatten(1).sum(1)
        return out


def _profile_with_brute(model, x, y, config=None, **kwargs):
    """Trace one step of `model` with the tracer and with `BruteForce` at once; returns the report
    and the conv / linear counts of both, {(layer, phase, time_step): ops}."""
    brute = BruteForce(model)
    try:
        chip = NeuroCore(config or ChipConfig.preset("paper-28nm-fp16"))
        counts, gpu = chip.trace(model, x, y, **kwargs)
    finally:
        brute.remove()
    report = chip.report(counts, gpu)
    expected = brute.counts(counts.time_steps, counts.batch_size)
    got = {(r["layer"], r["phase"], r["time_step"]): r["ops"] for r in report.rows
           if r["kind"] in ("conv", "linear") and (r["ops"] or r["dense_ops"])}
    return report, got, expected


def _rand_batch(shape, seed=0, low=0.0):
    """Uniform values in [low, 1) of `shape`, from their own generator (`seed`)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * (1 - low) + low


@pytest.fixture(scope="session")
def brute_force():
    """The `BruteForce` class: hooks a model, then counts from the definitions."""
    return BruteForce


@pytest.fixture(scope="session")
def profile_with_brute():
    return _profile_with_brute


@pytest.fixture(scope="session")
def rand_batch():
    return _rand_batch
