"""NIR export and import of zoo SNNs (the `nir` package), and the `spikefed-export` command.

A `csnn` or `mlp` (float or quantization-aware) becomes a chain of NIR nodes:

    csnn: Input [C, H, W] - Conv2d - LIF|IF - AvgPool2d - Conv2d - LIF|IF - AvgPool2d
          - Flatten - Affine - Output
    mlp:  Input [C, H, W] - Flatten - Affine - LIF|IF - Affine - Output

BatchNorm (eval mode, running statistics) is folded into the preceding conv / linear:
`w' = w * g / sqrt(var + eps)` per output channel, `b' = beta + (b - mean) * g / sqrt(var + eps)`,
computed in float64 and stored as float32. A quantization-aware model exports its fake-quantized
weights `codes * 2**e` (exact in float32) and is folded like a float model, so the graph holds the
float dynamics of the quantized weights, not the integer engine's fixed-point membranes.
With `pooling="sum"`, each 2x2 average pool is a `SumPool2d` and its 1/4 is folded into the next
layer's weights (a power of two: exact).

Neurons, discretised with the forward-Euler step `dt` (seconds, `DT` by default): our step
`h[t] = decay * v[t-1] + x[t]` is NIR's `tau dv/dt = (v_leak - v) + r I` with

    LIF: tau = dt / (1 - decay),  r = tau / dt = 1 / (1 - decay),  v_leak = 0,
         v_threshold = threshold, v_reset = 0
    IF:  r = 1 / dt (dv/dt = r I, so one step adds x),  v_threshold = threshold, v_reset = 0

With decay 1 - 2**-k and a power-of-two dt every one of these numbers is exact in float32.
What NIR cannot say goes into the graph's `metadata` (all strings or numbers): reset by
subtraction (NIR's neurons reset to `v_reset`), firing on `h >= threshold` (NIR: `v > v_thr`),
the readout (the output node's values averaged over the T steps), T, the input coding (direct:
the analog image is the input at every step; event frames: one frame per step), the weight bits,
dt, and the model spec that `from_nir` rebuilds.

`from_nir(graph)` rebuilds a spikefed `SpikingNet` (`NIRNet`) from such a chain: its logits
equal, bit for bit, those of `fold_batchnorm(model)` (the original with BN folded); against the
unfolded original they differ only by the fold's float rounding.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
import typer
from torch import Tensor, nn

from shared.cli import user_errors
from shared.errors import UserError
from shared.snn.models import CSNN, MLP, SpikingNet, over_time
from shared.snn.neuron import IF, LIF

if TYPE_CHECKING:
    import nir

DT = 2.0**-10  # seconds a time step lasts in the exported graph (~0.98 ms; a power of two)
Pooling = Literal["avg", "sum"]

__all__ = ["DT", "ExportError", "NIRNet", "fold_batchnorm", "from_nir", "read_nir", "to_nir",
           "write_nir"]


class ExportError(UserError, ValueError):
    """A model or graph that cannot be exported / imported; the message says why."""


# ---------------------------------------------------------------------------------------------
# the layer chain of a zoo model

def _chain(model: nn.Module) -> list[tuple[str, str, nn.Module | None, nn.Module | None]]:
    """(node name, kind, layer, batchnorm) in forward order; kind in conv, affine, neuron, pool,
    flatten."""
    base = next((c for c in type(model).__mro__ if c in (CSNN, MLP)), None)
    if base is CSNN:
        m = model
        return [("conv1", "conv", m.conv1, m.bn1), ("sn1", "neuron", m.sn1, None),
                ("pool1", "pool", m.pool1, None), ("conv2", "conv", m.conv2, m.bn2),
                ("sn2", "neuron", m.sn2, None), ("pool2", "pool", m.pool2, None),
                ("flatten", "flatten", None, None), ("fc", "affine", m.fc, None)]
    if base is MLP:
        m = model
        return [("flatten", "flatten", None, None), ("fc1", "affine", m.fc1, m.bn1),
                ("sn1", "neuron", m.sn1, None), ("fc2", "affine", m.fc2, None)]
    raise ExportError(
        f"cannot export a {type(model).__name__} to NIR: only the csnn and mlp zoo models are "
        "chains of NIR nodes (resnet-mini's residual sums and converted SNNs' initial "
        "potentials are not supported)")


def _weight(layer: nn.Module) -> Tensor:
    """The weight the layer computes with: fake-quantized for QAT layers."""
    from shared.quant.fake import QConv2d, QLinear, fake_quant_weight

    if isinstance(layer, (QConv2d, QLinear)):
        return fake_quant_weight(layer.weight, layer.bits).detach()
    return layer.weight.detach()


def _folded(layer: nn.Module, bn: nn.Module | None) -> tuple[Tensor, Tensor]:
    """(weight, bias) float32 of `layer` with `bn` (running statistics) folded in (float64)."""
    w = _weight(layer).double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    if bn is not None:
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_var is None:
            raise ExportError(f"cannot fold {type(bn).__name__}: BatchNorm with running "
                              "statistics expected")
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = bn.bias.detach().double() + (b - bn.running_mean.double()) * scale
    return w.float(), b.float()


def _neuron_params(neuron: LIF) -> tuple[float, float, str]:
    if not isinstance(neuron, LIF):
        raise ExportError(f"cannot export neuron {type(neuron).__name__}: LIF or IF expected")
    v_init = neuron.v_init
    if isinstance(v_init, Tensor):
        if v_init.numel() != 1:
            raise ExportError("cannot export a neuron with a per-neuron initial potential: "
                              "NIR neurons start at 0")
        v_init = float(v_init)
    if v_init != 0.0:
        raise ExportError(f"cannot export a neuron with initial potential {v_init}: NIR "
                          "neurons start at 0")
    return neuron.decay, neuron.threshold, neuron.reset


def fold_batchnorm(model: nn.Module) -> NIRNet:
    """`model` (csnn or mlp, float or QAT) as the `NIRNet` its NIR graph describes: BN folded,
    fake-quantized weights made plain, the same neurons. Logits match the original up to the
    fold's rounding."""
    return from_nir(to_nir(model))


# ---------------------------------------------------------------------------------------------
# export

def _model_spec(model: SpikingNet) -> dict[str, Any]:
    first = model.conv1 if isinstance(model, CSNN) else model.fc1
    neuron = next(m for m in model.modules() if isinstance(m, LIF))
    spec: dict[str, Any] = {"name": "csnn" if isinstance(model, CSNN) else "mlp",
                            "time_steps": model.time_steps,
                            "neuron": "if" if neuron.decay == 1.0 else "lif",
                            "decay": neuron.decay, "threshold": neuron.threshold,
                            "reset": neuron.reset}
    if isinstance(model, CSNN):
        spec["in_channels"] = first.in_channels
        spec["num_classes"] = model.fc.out_features
    else:
        spec["num_classes"] = model.fc2.out_features
        spec["hidden"] = model.fc1.out_features
    return spec


def to_nir(model: nn.Module, *, dt: float = DT, pooling: Pooling = "avg",
           input_shape: tuple[int, int, int] | None = None) -> nir.NIRGraph:
    """The NIR graph of a zoo `csnn` or `mlp` (see the module docstring).

    `input_shape` `(C, H, W)` is needed for an mlp (its first layer only knows C*H*W); for a
    csnn it is read from the model. `dt` is in seconds; `pooling` "avg" keeps AvgPool2d, "sum"
    writes SumPool2d with the 1/4 folded into the next layer."""
    import nir

    if pooling not in ("avg", "sum"):
        raise ExportError(f"unknown pooling {pooling!r}; choose avg or sum")
    if not (math.isfinite(dt) and dt > 0):
        raise ExportError(f"dt must be a positive number of seconds, got {dt}")
    chain = _chain(model)
    spec = _model_spec(model)
    neurons = [layer for _, kind, layer, _ in chain if kind == "neuron"]
    params = {_neuron_params(n) for n in neurons}
    if len(params) != 1:
        raise ExportError("cannot export neurons with different decay / threshold / reset")
    decay, threshold, reset = params.pop()
    bits = getattr(model, "bits", 32)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    elif isinstance(model, CSNN):
        side = math.isqrt(model.fc.in_features // 32) * 4
        shape = (model.conv1.in_channels, side, side)
    else:  # an mlp: C*H*W square images of 1 (images) or 2 (ON/OFF events) channels
        n = model.fc1.in_features
        channels = 1 if math.isqrt(n) ** 2 == n else 2
        shape = (channels, math.isqrt(n // channels), math.isqrt(n // channels))
    if isinstance(model, MLP) and math.prod(shape) != model.fc1.in_features:
        raise ExportError(f"input_shape {shape} does not fit the mlp's {model.fc1.in_features} "
                          "inputs; pass input_shape=(C, H, W)")
    spec["in_channels"], spec["input_size"] = shape[0], shape[1]

    nodes: dict[str, nir.NIRNode] = {"input": nir.Input(input_type=np.array(shape))}
    order = ["input"]
    hw = shape[1:]
    carry = 1.0  # scale folded into the next synaptic layer (sum pooling's 1/4)
    for name, kind, layer, bn in chain:
        if kind in ("conv", "affine"):
            w, b = _folded(layer, bn)
            w = (w * carry).numpy()
            carry = 1.0
            if kind == "conv":
                nodes[name] = nir.Conv2d(input_shape=tuple(hw), weight=w,
                                         stride=layer.stride, padding=layer.padding,
                                         dilation=layer.dilation, groups=layer.groups,
                                         bias=b.numpy())
                hw = tuple(int(s) for s in nodes[name].output_type["output"][1:])
            else:
                nodes[name] = nir.Affine(weight=w, bias=b.numpy())
            width = w.shape[0]
        elif kind == "neuron":
            n_shape = (width, *hw) if isinstance(nodes[order[-1]], nir.Conv2d) else (width,)
            ones = np.ones(n_shape, dtype=np.float32)
            thr = ones * np.float32(threshold)
            if decay == 1.0:
                nodes[name] = nir.IF(r=ones / np.float32(dt), v_threshold=thr,
                                     v_reset=ones * 0)
            else:
                tau = dt / (1.0 - decay)
                nodes[name] = nir.LIF(tau=ones * np.float32(tau),
                                      r=ones * np.float32(1.0 / (1.0 - decay)),
                                      v_leak=ones * 0, v_threshold=thr, v_reset=ones * 0)
        elif kind == "pool":
            two = np.array([2, 2])
            if pooling == "avg":
                nodes[name] = nir.AvgPool2d(kernel_size=two, stride=two, padding=np.array([0, 0]))
            else:
                nodes[name] = nir.SumPool2d(kernel_size=two, stride=two, padding=np.array([0, 0]))
                carry = 0.25
            hw = (hw[0] // 2, hw[1] // 2)
        else:  # flatten: NIR shapes have no batch dimension, so start_dim 0 is all of (C, H, W)
            in_type = np.array((width, *hw)) if order[-1] != "input" else np.array(shape)
            nodes[name] = nir.Flatten(input_type={"input": in_type}, start_dim=0, end_dim=-1)
        order.append(name)
    nodes["output"] = nir.Output(output_type=np.array([width]))
    order.append("output")
    metadata = {
        "producer": "spikefed",
        "format": "spikefed-nir-1",
        "dt": float(dt),
        "time_steps": int(model.time_steps),
        "reset": "subtract: v = h - v_threshold after a spike (NIR's v_reset is unused)"
        if reset == "subtract" else "zero: v = v_reset = 0 after a spike",
        "reset_mode": reset,
        "firing": ">=: a neuron fires when v >= v_threshold (NIR writes v > v_thr)",
        "readout": "mean over the T steps of the output node (logits), no threshold",
        "input_coding": "direct: the analog input [C, H, W] in [0, 1] is the input current at "
        "each of the T steps; event data: frame t [2, H, W] in {0, 1} at step t",
        "weight_bits": int(bits),
        "batchnorm": "folded into the preceding conv / affine (running statistics)",
        "pooling": "avg" if pooling == "avg" else "sum: 1/4 folded into the next layer",
        "discretisation": "forward Euler with step dt: v += dt / tau * (v_leak - v + r * I)",
        "model": json.dumps(spec, sort_keys=True),
    }
    if bits != 32:
        metadata["quantization"] = (f"weights are the {bits}-bit fake-quantized values "
                                    "(codes * 2**e per output channel), exact in float32")
    edges = list(zip(order[:-1], order[1:], strict=True))
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    except (ValueError, AssertionError, TypeError) as err:  # a bug here, not the user's
        raise ExportError(f"NIR rejected the graph: {str(err).splitlines()[0]}") from err


def write_nir(graph: nir.NIRGraph, path: str | Path) -> Path:
    """Write `graph` as NIR's HDF5 file; returns the path."""
    import nir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    nir.write(tmp, graph)
    tmp.replace(path)
    return path


def read_nir(path: str | Path) -> nir.NIRGraph:
    """Read a NIR HDF5 file; a missing or unreadable file is an `ExportError`."""
    import nir

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"NIR file {path} does not exist")
    try:
        return nir.read(path)
    except Exception as err:  # noqa: BLE001 - h5py and nir raise many kinds
        raise ExportError(f"{path} is not a readable NIR graph: "
                          f"{(str(err).splitlines() or [type(err).__name__])[0][:200]}") from None


# ---------------------------------------------------------------------------------------------
# import

class NIRNet(SpikingNet):
    """A spikefed model rebuilt from a NIR chain: the layers before the first neuron form the
    head (computed once for direct coding), the rest run over `[T, B, ...]`; the readout is the
    output averaged over T, as in the zoo models."""

    def __init__(self, layers: list[tuple[str, nn.Module]], time_steps: int) -> None:
        super().__init__(time_steps, in_dims=4)
        self.layers = nn.ModuleDict(layers)
        names = [n for n, _ in layers]
        first = next((i for i, (_, m) in enumerate(layers) if isinstance(m, LIF)), len(layers))
        self._head, self._body = names[:first], names[first:]

    def head(self, x: Tensor) -> Tensor:
        for name in self._head:
            x = self.layers[name](x)
        return x

    def body(self, z_seq: Tensor) -> Tensor:
        for name in self._body:
            layer = self.layers[name]
            z_seq = layer(z_seq) if isinstance(layer, LIF) else over_time(layer, z_seq)
        return z_seq


def _uniform(values: Any, what: str) -> float:
    unique = np.unique(np.asarray(values, dtype=np.float64))
    if unique.size != 1:
        raise ExportError(f"{what} differs between neurons; spikefed neurons share one value")
    return float(unique[0])


def from_nir(graph: nir.NIRGraph | str | Path, *, time_steps: int | None = None) -> NIRNet:
    """Rebuild a spikefed model from a NIR chain (a graph or a `.nir` file). The graph's metadata
    (written by `to_nir`) gives T, dt and the reset; a foreign graph needs `time_steps` and is
    read with dt = `DT`, reset to v_reset."""
    import nir

    if not isinstance(graph, nir.NIRGraph):
        graph = read_nir(graph)
    meta = graph.metadata or {}
    dt = float(meta.get("dt", DT))
    steps = time_steps or int(meta.get("time_steps", 0))
    if steps < 1:
        raise ExportError("the graph does not say T (metadata time_steps): pass time_steps")
    reset = str(meta.get("reset_mode", "zero"))
    following = {src: dst for src, dst in graph.edges}
    if len(following) != len(graph.edges):
        raise ExportError("the NIR graph branches: only chains of nodes are supported")
    name = next((n for n, node in graph.nodes.items() if isinstance(node, nir.Input)), None)
    if name is None:
        raise ExportError("the NIR graph has no Input node")
    layers: list[tuple[str, nn.Module]] = []
    while name in following:
        name = following[name]
        node = graph.nodes[name]
        if isinstance(node, nir.Output):
            break
        layers.append((name, _module(node, dt, reset)))
    return NIRNet(layers, steps).eval()


def _module(node: Any, dt: float, reset: str) -> nn.Module:
    import nir

    if isinstance(node, nir.Conv2d):
        w = torch.as_tensor(np.asarray(node.weight, dtype=np.float32))
        padding = node.padding if isinstance(node.padding, str) else tuple(node.padding)
        conv = nn.Conv2d(w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]),
                         stride=tuple(node.stride), padding=padding,
                         dilation=tuple(node.dilation), groups=int(node.groups))
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(torch.as_tensor(np.asarray(node.bias, dtype=np.float32)))
        return conv
    if isinstance(node, (nir.Affine, nir.Linear)):
        w = torch.as_tensor(np.asarray(node.weight, dtype=np.float32))
        bias = getattr(node, "bias", None)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float32)))
        return linear
    if isinstance(node, nir.Flatten):
        start = node.start_dim + 1 if node.start_dim >= 0 else node.start_dim
        end = node.end_dim + 1 if node.end_dim >= 0 else node.end_dim
        return nn.Flatten(start, end)
    if isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        k, s = tuple(int(v) for v in node.kernel_size), tuple(int(v) for v in node.stride)
        p = tuple(int(v) for v in node.padding)
        if k == (2, 2) and s == (2, 2) and p == (0, 0):
            from shared.snn.models import AvgPool2x2

            pool: nn.Module = AvgPool2x2()
        else:
            pool = nn.AvgPool2d(k, s, p)
        return pool if isinstance(node, nir.AvgPool2d) else _Scaled(pool, k[0] * k[1])
    if isinstance(node, (nir.LIF, nir.IF)):
        threshold = _uniform(node.v_threshold, "v_threshold")
        v_reset = _uniform(node.v_reset, "v_reset")
        r = _uniform(node.r, "r")
        if reset == "zero" and v_reset != 0.0:
            raise ExportError(f"v_reset {v_reset} is not supported: spikefed resets to 0")
        if isinstance(node, nir.IF):
            if not math.isclose(r * dt, 1.0, rel_tol=1e-6):
                raise ExportError(f"IF with r * dt = {r * dt} is not supported (needs 1)")
            return IF(threshold=threshold, reset=reset, surrogate="atan")
        tau = _uniform(node.tau, "tau")
        if _uniform(node.v_leak, "v_leak") != 0.0:
            raise ExportError("LIF with v_leak != 0 is not supported")
        decay = 1.0 - dt / tau
        if not math.isclose(r * dt / tau, 1.0, rel_tol=1e-6) or not 0.0 < decay < 1.0:
            raise ExportError(f"LIF with r * dt / tau = {r * dt / tau} is not supported "
                              "(needs 1 and tau > dt)")
        return LIF(decay=decay, threshold=threshold, reset=reset, surrogate="atan")
    raise ExportError(f"unsupported NIR node {type(node).__name__}: spikefed reads Conv2d, "
                      "Affine, Linear, Flatten, AvgPool2d, SumPool2d, LIF and IF")


class _Scaled(nn.Module):
    """A pooling layer times a constant (SumPool2d = AvgPool2d x kernel area)."""

    def __init__(self, pool: nn.Module, factor: float) -> None:
        super().__init__()
        self.pool, self.factor = pool, float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x) * self.factor


# ---------------------------------------------------------------------------------------------
# the command

cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-export runs/default --format nir --out model.nir\n\n"
    "  spikefed-export runs/default/checkpoints/round-010.safetensors --out model.nir "
    "--pooling sum"
)
@user_errors
def main(
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint (.safetensors with its .json) or a run directory (newest round).")],
    out: Annotated[Path, typer.Option(help="The file to write.")],
    format: Annotated[str, typer.Option("--format", help="Output format: nir.")] = "nir",  # noqa: A002
    pooling: Annotated[str, typer.Option(
        help="avg: AvgPool2d; sum: SumPool2d with 1/4 folded into the next weights.")] = "avg",
    dt: Annotated[float, typer.Option(help="Seconds per time step in the graph.")] = DT,
) -> None:
    """Export a global model to NIR (Neuromorphic Intermediate Representation): BatchNorm folded,
    LIF/IF neurons with tau, r, v_threshold from the model, what NIR cannot say in metadata."""
    from shared.rebuild import load_global_model

    if format != "nir":
        raise ExportError(f"unknown --format {format!r}; spikefed exports: nir")
    if pooling not in ("avg", "sum"):
        raise ExportError(f"unknown --pooling {pooling!r}; choose avg or sum")
    gm = load_global_model(checkpoint)
    if gm.kind != "snn":
        raise ExportError(f"checkpoint {gm.path} holds a {gm.kind} model; NIR export takes a "
                          "trained SNN (csnn or mlp)")
    spec = gm.spec
    shape = (spec["in_channels"], spec["input_size"], spec["input_size"])
    graph = to_nir(copy.deepcopy(gm.model).eval(), dt=dt, pooling=pooling,  # type: ignore[arg-type]
                   input_shape=shape)
    path = write_nir(graph, out)
    typer.echo(f"wrote {path} ({len(graph.nodes)} nodes, T={graph.metadata['time_steps']}, "
               f"dt={dt:g} s)")


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
