"""The integer-only engine: export of a quantized model, its forward, save and load.

`to_integer(qat_model)` folds every stage (see `shared.quant.qat`) and returns an `IntegerModel`:
an `nn.Module` whose state dict holds only integer tensors (int8 weight codes, int32 biases,
thresholds and initial potentials, per-channel shifts) and whose forward runs on int32 only —
integer convolutions and matrix products, add, compare, arithmetic shift. It takes uint8 images
`[B, C, H, W]` or binary event frames `[T, B, C, H, W]` and returns int32 logits with

    qat_model.eval()(x_uint8.float() / 255) == int_logits * output_scale      (exactly)

`output_scale` is a power of two. Every stage's static accumulator bound is checked at export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .fake import QuantError, integer_neuron
from .qat import (
    QuantizedMixin,
    Readout,
    Spiking,
    SumPool,
    fold_readout,
    fold_spiking,
    time_norm_shift,
)

KIND = "spikefed-integer-snn/1"
INT32_MAX = 2**31 - 1


def _int(t: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
    return t.round().to(dtype)


def _sum_pool2(x: Tensor) -> Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]


def _layer_spec(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, nn.Conv2d):
        return {"layer": "conv2d", "stride": list(layer.stride), "padding": list(layer.padding)}
    return {"layer": "linear"}


class IntegerModel(nn.Module):
    """Integer-only inference of an exported spiking model (see the module docstring)."""

    def __init__(self, graph: list[dict[str, Any]], time_steps: int, in_dims: int,
                 output_scale: float) -> None:
        super().__init__()
        self.graph = graph
        self.time_steps = time_steps
        self.in_dims = in_dims
        self.output_scale = output_scale
        for node in graph:
            if node["op"] != "sumpool":
                self.add_module(node["name"], nn.Module())

    def _set(self, name: str, **tensors: Tensor) -> None:
        holder = getattr(self, name)
        for key, value in tensors.items():
            holder.register_buffer(key, value)

    def describe(self) -> dict[str, Any]:
        """The JSON description of the graph (saved beside the tensors)."""
        return {"kind": KIND, "graph": self.graph, "time_steps": self.time_steps,
                "in_dims": self.in_dims, "output_scale": self.output_scale}

    def _synapse(self, node: dict[str, Any], codes: Tensor) -> Tensor:
        weight = getattr(self, node["name"]).weight.to(torch.int32)
        if node["layer"] == "conv2d":
            return F.conv2d(codes, weight, None, node["stride"], node["padding"])
        if node.get("flatten"):
            codes = codes.flatten(1)
        return codes @ weight.T

    def _over(self, fn, codes: Tensor, static: bool) -> Tensor:
        return fn(codes) if static else fn(codes.flatten(0, 1)).unflatten(0, codes.shape[:2])

    def _check_input(self, x: Tensor) -> bool:
        static = x.dim() == self.in_dims
        if not static and x.dim() != self.in_dims + 1:
            raise QuantError(f"expected uint8 images of rank {self.in_dims} or binary event "
                             f"frames of rank {self.in_dims + 1}, got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point:
            raise QuantError("IntegerModel takes uint8 images or binary (bool/uint8) event "
                             f"frames, not {x.dtype}; pass (x * 255).round().to(torch.uint8)")
        if not static and x.numel() and int(x.max()) > 1:
            raise QuantError("event frames must be binary (0/1)")
        return static

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        static = self._check_input(x)
        codes = x.to(torch.int32)
        if not static:  # an event is a full-scale input: pixel code 255, as in training
            codes = codes * 255
        steps = self.time_steps
        for node in self.graph:
            if node["op"] == "sumpool":
                codes = _sum_pool2(codes)
                continue
            p = getattr(self, node["name"])
            acc = self._over(lambda u, n=node: self._synapse(n, u), codes, static)
            if node["op"] == "readout":
                total = acc * steps if static else acc.sum(0, dtype=torch.int32)
                total = (total << node["frac"]) + steps * p.bias
                return torch.bitwise_left_shift(total, p.shift.to(torch.int32))
            view = (-1,) + (1,) * (acc.dim() - (2 if static else 3))
            current = torch.bitwise_left_shift(acc, p.shift.to(torch.int32).view(view))
            current = current + p.bias.view(view)
            if static:
                current = current.unsqueeze(0).expand(steps, *current.shape)
                static = False
            codes, _ = integer_neuron(current, p.theta.view(view), p.v_init.view(view),
                                      node["leak_shift"], node["reset"] == "subtract")
        raise QuantError("integer graph has no readout")


def to_integer(qat_model: nn.Module) -> IntegerModel:
    """Export a quantized model (from `quantize`) to the integer-only engine."""
    if not isinstance(qat_model, QuantizedMixin):
        raise QuantError(
            f"to_integer needs a model from shared.quant.quantize(); got {type(qat_model).__name__}"
            " (a float model has no integer weights: quantize and train it first)"
        )
    graph: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, Tensor]] = {}
    output_scale = None
    for stage in qat_model.stages:
        if isinstance(stage, SumPool):
            graph.append({"op": "sumpool", "name": stage.name})
        elif isinstance(stage, Spiking):
            fold = fold_spiking(qat_model, stage)
            graph.append({"op": "spiking", "name": stage.synapse, "flatten": stage.flatten,
                          "leak_shift": fold.leak_shift,
                          "reset": "subtract" if fold.subtract else "zero", "bound": fold.bound,
                          **_layer_spec(getattr(qat_model, stage.synapse))})
            tensors[stage.synapse] = {
                "weight": _int(fold.codes, torch.int8), "shift": _int(fold.shift),
                "bias": _int(fold.bias), "theta": _int(fold.theta),
                "v_init": _int(fold.v_init.expand_as(fold.theta)),
            }
        elif isinstance(stage, Readout):
            fold = fold_readout(qat_model, stage)
            graph.append({"op": "readout", "name": stage.synapse, "flatten": stage.flatten,
                          "frac": fold.frac, "bound": fold.bound,
                          **_layer_spec(getattr(qat_model, stage.synapse))})
            tensors[stage.synapse] = {"weight": _int(fold.codes, torch.int8),
                                      "bias": _int(fold.bias), "shift": _int(fold.shift)}
            output_scale = fold.output_scale
    if output_scale is None:
        raise QuantError("model has no readout stage")
    for node in graph:
        if node.get("bound", 0) > INT32_MAX:
            raise QuantError(f"{node['name']}: accumulator bound {node['bound']} overflows int32")
    model = IntegerModel(graph, qat_model.time_steps, qat_model.in_dims, output_scale)
    for name, group in tensors.items():
        model._set(name, **group)
    return model


def save_integer(model: IntegerModel, path: str | Path) -> Path:
    """Write the integer tensors (safetensors) and the graph description (JSON + sha256)."""
    return save_checkpoint(path, model.state_dict(), model.describe())


def load_integer(path: str | Path) -> IntegerModel:
    """Load a model written by `save_integer` (hash verified)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != KIND:
        kind = meta.get("kind")
        raise CheckpointError(f"{path} is not an integer spikefed model (kind {kind!r})")
    model = IntegerModel(meta["graph"], int(meta["time_steps"]), int(meta["in_dims"]),
                         float(meta["output_scale"]))
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        if value.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {key} is not integer")
        groups.setdefault(name, {})[field] = value
    for name, group in groups.items():
        if not hasattr(model, name):
            raise CheckpointError(f"{path}: tensor group {name!r} is not in the graph")
        model._set(name, **group)
    return model


__all__ = ["IntegerModel", "load_integer", "save_integer", "time_norm_shift", "to_integer"]
