"""Which model a run or checkpoint holds, and how it is rebuilt: the one place that knows.

A model is described by a *spec*, the keyword arguments of `shared.snn.build_model` plus
`weight_bits` and, for `train-mode = "qann"`, `train_mode: "qann"` (`RunConfig.model_spec()`
makes it; every checkpoint's metadata keeps it under `model`). A checkpoint holds one of three
kinds of model:

    snn            a trained SNN (quantization-aware unless weight_bits is 32)
    qann           a clip-quantize ANN (train-mode qann, before conversion)
    converted-snn  the IF network the server converted a QC-ANN into (its metadata adds
                   kind, time_steps, in_dims and the QC thresholds: `converted_metadata`)

`build_from_spec(spec)` builds a fresh model; `load_global_model(path)` verifies a checkpoint (or
a run directory's newest) and rebuilds it with its weights. A spec read from a file is checked by
`check_spec` first (`shared.checkpoint.load_checkpoint` does it): known keys, typed values, sizes
within `SPEC_LIMITS`, and at most `MAX_PARAMETERS` numbers in the model (counted on PyTorch's
`meta` device, which allocates nothing), so a checkpoint cannot make us allocate gigabytes. The
client, the server, the `spikefed-evaluate` command and the neurocore CLI all go through here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shared.checkpoint import load_checkpoint
from shared.errors import CheckpointError
from shared.rundir import resolve_checkpoint

SNN, QANN, CONVERTED_SNN = "snn", "qann", "converted-snn"

# inclusive bounds of a spec's sizes: far above every dataset and model spikefed has
SPEC_LIMITS = {"in_channels": (1, 64), "num_classes": (2, 10_000), "input_size": (1, 512),
               "time_steps": (1, 256), "hidden": (1, 16_384)}
MAX_PARAMETERS = 50_000_000  # 200 MB of float32 weights
_CHOICES = {"neuron": ("lif", "if"), "weight_bits": (2, 3, 4, 5, 6, 7, 8, 32),
            "train_mode": (SNN, QANN), "detach_reset": (True, False)}
_FLOATS = ("decay", "threshold", "v_init")
_RESETS = ("subtract", "zero")


def check_spec(spec: Any, what: str = "model spec") -> dict[str, Any]:
    """`spec` if it describes a model of bounded size; a one-line CheckpointError otherwise."""
    import math

    from shared.snn import MODELS, SURROGATES

    if not isinstance(spec, dict):
        raise CheckpointError(f"{what}: the model spec is {type(spec).__name__}, not a mapping")
    known = {"name", "surrogate", "reset", *SPEC_LIMITS, *_CHOICES, *_FLOATS}
    unknown = sorted(str(k)[:40] for k in spec if k not in known)
    if unknown:
        raise CheckpointError(f"{what}: unknown model spec keys {', '.join(unknown[:5])}")
    if not isinstance(spec.get("name"), str) or spec["name"] not in MODELS:
        raise CheckpointError(f"{what} is of an unknown model {str(spec.get('name'))[:40]!r}; "
                              f"spikefed knows {', '.join(MODELS)}")
    for key in ("in_channels", "num_classes", "input_size", "time_steps"):
        if key not in spec:
            raise CheckpointError(f"{what}: the model spec lacks '{key}'")
    for key, (low, high) in SPEC_LIMITS.items():
        value = spec.get(key, low)
        if type(value) is not int or not low <= value <= high:
            raise CheckpointError(f"{what}: model {key}={str(value)[:40]} is outside "
                                  f"{low}..{high}")
    for key, allowed in _CHOICES.items():
        if key in spec and (spec[key] not in allowed or type(spec[key]) is not type(allowed[0])):
            raise CheckpointError(f"{what}: model {key}={str(spec[key])[:40]} is not one of "
                                  f"{', '.join(map(str, allowed))}")
    if not isinstance(spec.get("surrogate", "atan"), str) or spec.get("surrogate", "atan") \
            not in SURROGATES:
        raise CheckpointError(f"{what}: model surrogate {str(spec['surrogate'])[:40]!r} is not "
                              f"one of {', '.join(SURROGATES)}")
    if not isinstance(spec.get("reset", "subtract"), str) or spec.get("reset", "subtract") \
            not in _RESETS:
        raise CheckpointError(f"{what}: model reset {str(spec['reset'])[:40]!r} is not one of "
                              f"{', '.join(_RESETS)}")
    for key in _FLOATS:
        value = spec.get(key, 0.0)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise CheckpointError(f"{what}: model {key}={str(value)[:40]} is not a finite number")
    with torch.device("meta"):  # shapes only: nothing is allocated
        try:
            model = build_from_spec(spec)
        except (TypeError, ValueError, RuntimeError, KeyError, NotImplementedError) as err:
            raise CheckpointError(f"{what}: the model spec does not build "
                                  f"({str(err).splitlines()[0][:200]})") from None
    count = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{what}: the model spec asks for {count:,} numbers, more than "
                              f"the {MAX_PARAMETERS:,} spikefed loads")
    return spec


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The model a spec describes: `build_model`, then quantization-aware (`shared.quant.
    quantize`) unless `weight_bits` is 32. With `train_mode: qann`, the zoo model's ReLU twin
    with clip-quantize activations of L = time_steps levels (`shared.convert`), its weights
    fake-quantized to `weight_bits`."""
    from shared.quant import quantize
    from shared.snn import build_model

    kwargs = dict(spec)
    bits = int(kwargs.pop("weight_bits", 32))
    if kwargs.pop("train_mode", SNN) == QANN:
        from shared.convert import build_ann, to_qc_ann

        ann = build_ann(kwargs["name"], in_channels=kwargs["in_channels"],
                        num_classes=kwargs["num_classes"], input_size=kwargs["input_size"],
                        weight_bits=bits)
        return to_qc_ann(ann, kwargs["time_steps"])
    model = build_model(**kwargs)
    return model if bits == 32 else quantize(model, bits)


def model_kind(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """`snn`, `qann` or `converted-snn` for a checkpoint's metadata and model spec."""
    if meta.get("kind") == CONVERTED_SNN:
        return CONVERTED_SNN
    return QANN if spec.get("train_mode") == QANN else SNN


def converted_metadata(qc_ann: nn.Module, snn: nn.Module) -> dict[str, Any]:
    """What `load_converted` needs besides the spec of the QC-ANN: T, input rank, the thresholds
    (they set the neurons and the scales folded into the SNN) and each v_init's shape."""
    from shared.convert import qc_activations

    return {
        "kind": CONVERTED_SNN,
        "time_steps": snn.time_steps,
        "in_dims": snn.in_dims,
        "thresholds": {name: float(m.theta.detach()) for name, m in qc_activations(qc_ann)},
    }


def load_converted(qc_ann: nn.Module, tensors: dict[str, Tensor], meta: Mapping[str, Any]
                   ) -> nn.Module:
    """Rebuild a converted SNN from its checkpoint: `qc_ann` is a fresh QC-ANN of the same
    architecture (`build_from_spec(meta["model"])`), `tensors` / `meta` the checkpoint's."""
    from shared.convert import ConvertError, QCActivation, convert
    from shared.snn import spiking_neurons

    if meta.get("kind") != CONVERTED_SNN:
        raise ConvertError("checkpoint is not a converted SNN (metadata kind != converted-snn)")
    ann = copy.deepcopy(qc_ann)
    modules = dict(ann.named_modules())
    with torch.no_grad():
        for name, theta in meta["thresholds"].items():
            if not isinstance(modules.get(name), QCActivation):
                raise ConvertError(f"checkpoint threshold for '{name}', not a QC activation here")
            modules[name].theta.fill_(theta)
    snn = convert(ann.eval(), int(meta["time_steps"]), int(meta["in_dims"]))
    for name, neuron in spiking_neurons(snn):
        key = f"{name}.v_init"
        if key in tensors:
            neuron.v_init = nn.Parameter(torch.empty_like(tensors[key]))
    result = snn.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(f"checkpoint does not fit the converted model: missing "
                           f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    return snn.eval()


def build_with_state(spec: Mapping[str, Any], tensors: Mapping[str, Tensor],
                     meta: Mapping[str, Any] | None = None) -> nn.Module:
    """A model of `spec` holding `tensors` (federated state, or a converted SNN's state when
    `meta` says so), in eval mode."""
    from shared.snn import load_federated_state

    model = build_from_spec(spec)
    if model_kind(meta or {}, spec) == CONVERTED_SNN:
        return load_converted(model, dict(tensors), meta or {})
    load_federated_state(model, dict(tensors))
    return model.eval()


@dataclass
class GlobalModel:
    """A checkpointed global model, rebuilt: the deployed module, its tensors and metadata."""

    path: Path
    model: nn.Module
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    spec: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config") or {}

    @property
    def kind(self) -> str:
        """`snn`, `qann` or `converted-snn` (see the module's docstring)."""
        return model_kind(self.meta, self.spec)

    def framing(self):  # -> shared.data.Framing
        """How the run framed `nmnist` / `dvs-gesture` recordings (its `event-*` keys; the
        defaults for a run that predates them). A bad value is a `CheckpointError`."""
        from shared.data import DatasetError, Framing

        c = self.config
        try:
            return Framing(int(c.get("event-frames", Framing.frames)),
                           str(c.get("event-framing", Framing.mode)),
                           int(c.get("event-size", Framing.size)))
        except (TypeError, ValueError, OverflowError, DatasetError) as e:
            raise CheckpointError(f"checkpoint {self.path}: bad event framing: {e}") from None

    @property
    def quantized(self) -> bool:
        """Whether the model has an integer engine (a `shared.quant.quantize` model)."""
        from shared.quant.qat import QuantizedMixin

        return isinstance(self.model, QuantizedMixin)

    def rebuild(self, **changes: Any) -> nn.Module:
        """The same weights in a model built from the spec with `changes` (e.g. time_steps)."""
        return _rebuild(self.path, {**self.spec, **changes}, self.tensors, self.meta)


def _rebuild(path: Path, spec: dict[str, Any], tensors: dict[str, Tensor],
             meta: dict[str, Any]) -> nn.Module:
    try:
        return build_with_state(spec, tensors, meta)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not rebuild as {spec.get('name')}: "
                              f"{str(err).splitlines()[0]}") from None


def load_global_model(path: str | Path) -> GlobalModel:
    """Load and verify a checkpoint (sha256), or a run directory's newest, and rebuild its
    model from the metadata."""
    path = resolve_checkpoint(path)
    tensors, meta = load_checkpoint(path)  # the spec is checked (check_spec) on the way
    spec = check_spec(meta.get("model"), f"checkpoint {path}")
    return GlobalModel(path, _rebuild(path, spec, tensors, meta), tensors, meta, dict(spec))
