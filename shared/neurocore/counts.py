"""Exact operation counts of a training step, read from its real tensors by module hooks.

For a synaptic layer (`nn.Conv2d`, `nn.Linear` or a subclass) at one time step, with x the input
it actually receives, dy = dL/dy the error at its output, nz() the nonzero mask and "in bounds"
meaning not zero padding:

    FP    = nonzero inputs in the receptive field of each output  = sum conv2d(nz(x), 1)
    BP    = nonzero errors reaching each input                     = sum conv2d_input(nz(dy), 1)
    WG    = co-nonzero (input, error) pairs of the weight gradient
                                                 = sum conv2d_weight(nz(x), nz(dy))
    dense = the same triples at density 1 (all three phases)

(Linear: FP = F_out nnz(x), BP = F_in nnz(dy), WG = nnz(x) nnz(dy), per row.) BP is counted only
when the layer's input needs a gradient (not for the first layer, whose input is data); WG only
when the weight is trainable.

None of these runs a convolution over channels. With G groups, a = the channel sum of nz(x) per
group ([N, G, H, W]), e = the channel sum of nz(dy) per group ([N, G, H', W']), box() the
single-channel conv2d with a ones kernel and the layer's stride / padding / dilation,
inb = box(ones(H, W)) the number of in-bounds taps of each output position and cover its adjoint
(the number of output positions whose receptive field covers each input position):

    FP = C_out/G * sum box(a) = C_out/G * sum_p a[p] cover[p]     (a matrix-vector product)
    BP = C_in/G * sum_q e_all[q] inb[q]
    WG = sum_q e[q] box(a)[q]

because every output channel sees the same receptive field (FP), every nonzero error fans out to
C_in/G channels at inb[q] positions (BP), and the pairs meeting at kernel offset k summed over k
are e[q] times the box sum of a over q's receptive field (WG). When no error is zero (the usual
case behind a BatchNorm) e = C_out/G everywhere, so WG = FP and BP = dense without touching a
mask. Masks are built with float `sign` (much faster than bool reductions on CPU); every count
is an exact integer per sample (float32 only while its partial sums stay integers below 2**24,
float64 otherwise), so that `shared.neurocore.cost` can split the work across cores.

Time steps: layers between neurons run on time-flattened `[T*B, ...]` tensors and are counted per
step. A direct-coded head (the layers before the first neuron, run once on `[B, ...]` and
broadcast over T) is counted once, at time step 0. Neurons (`shared.snn.LIF` and subclasses) see
`[T, B, ...]`. BatchNorm and average / max pooling are counted as vector-unit element work.
Residual additions that are not modules are not counted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from shared.snn.neuron import LIF

# Where a synaptic layer's input comes from (decides its storage and its op type).
SPIKES = "spikes"  # a neuron's output: binary, 1 bit
SPIKE_DERIVED = "spike-derived"  # pooled spikes: cheap to recompute from the stored spikes
DATA = "data"  # the model input or a fixed transform of it (no gradient path): already in DRAM
ACTIVATION = "activation"  # anything else: saved at state precision for the weight gradient

POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
MAX_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class SynapticCounts:
    """One synaptic layer at one time step, summed over its calls. Per-sample tensors are `[B]`."""

    layer: str
    kind: str  # "conv" | "linear"
    time_step: int
    once: bool  # a direct-coded head layer, computed once for all T steps
    source: str
    binary: bool  # every input value is 0 or 1 (spike accumulates instead of MACs)
    in_elems: int  # input elements per sample (summed over calls)
    out_elems: int
    weights: int  # weight elements
    dense: int  # dense triples per sample (summed over calls)
    fp: Tensor
    in_nonzero: float = 0.0
    bp: Tensor | None = None  # nonzero-error MACs (computed even where the BP row is skipped)
    wg: Tensor | None = None
    bp_needed: bool = False
    wg_needed: bool = False
    err_elems: int = 0  # error elements per sample seen by the backward hook
    err_nonzero: float = 0.0


@dataclass
class ElementCounts:
    """A neuron, norm or pooling layer at one time step: element work on the vector unit."""

    layer: str
    kind: str  # "neuron" | "norm" | "pool"
    time_step: int
    once: bool
    in_elems: int  # per sample and call
    out_elems: int
    fp_calls: int = 0
    bp_calls: int = 0
    has_params: bool = False  # a norm with trainable affine parameters (a WG row)
    training: bool = True  # a norm using batch statistics
    leak: bool = False  # a neuron with decay != 1
    spikes: float = 0.0  # neuron output spikes (summed over the batch)
    in_spikes: bool = False  # pooling of binary spikes


@dataclass
class StepCounts:
    """Everything the cost model needs about one training step."""

    batch_size: int
    time_steps: int
    event_input: bool
    data_elems: int = 0  # input elements per sample, all steps
    data_binary: bool = False
    synaptic: dict[tuple[str, int], SynapticCounts] = field(default_factory=dict)
    elements: dict[tuple[str, int], ElementCounts] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)  # module name -> trainable elements
    layer_order: list[str] = field(default_factory=list)  # first forward call order

    @property
    def spike_count(self) -> float:
        return sum(r.spikes for r in self.elements.values() if r.kind == "neuron")

    @property
    def neuron_steps(self) -> int:
        return sum(
            r.in_elems * r.fp_calls * self.batch_size
            for r in self.elements.values()
            if r.kind == "neuron"
        )


@dataclass
class _ConvGeometry:
    inb64: Tensor  # [H'*W'] float64: in-bounds taps of every output position
    cover: Tensor  # [C_in/G * H*W]: output positions whose receptive field covers each input
    taps: int  # sum of inb = sum of cover over one channel


class Tracer:
    """Hooks `model` so that every forward (+ backward) is counted into a `StepCounts`.

    Use as a context manager (or `attach` / `detach`); call `end_step()` after each backward to
    take that step's counts. A forward of the model starts a new step (an unended one is dropped).
    `time_steps` defaults to `model.time_steps`; inputs of rank `model.in_dims + 1` are event
    frames `[T, B, ...]`.
    """

    def __init__(self, model: nn.Module, time_steps: int | None = None) -> None:
        self.model = model
        self.time_steps = time_steps
        self._handles: list[Any] = []
        self._step: StepCounts | None = None
        self._marks: dict[int, tuple[weakref.ref, str]] = {}
        self._geometry: dict[tuple, _ConvGeometry] = {}
        self._params: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self) -> Tracer:
        if self._handles:
            return self
        hooks = self._handles
        hooks.append(self.model.register_forward_pre_hook(self._on_model_input))
        for name, module in self.model.named_modules():
            if isinstance(module, LIF):
                hooks.append(module.register_forward_hook(partial(self._on_neuron, name)))
            elif isinstance(module, nn.Conv2d):
                hooks.append(module.register_forward_hook(partial(self._on_conv, name)))
            elif isinstance(module, nn.Linear):
                hooks.append(module.register_forward_hook(partial(self._on_linear, name)))
            elif isinstance(module, _BatchNorm):
                hooks.append(module.register_forward_hook(partial(self._on_norm, name)))
            elif isinstance(module, POOLS):
                hooks.append(module.register_forward_hook(partial(self._on_pool, name)))
            numel = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            if numel:
                self._params[name] = numel
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Tracer:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def end_step(self) -> StepCounts:
        """The counts of the step begun by the last forward (after its backward, if any)."""
        if self._step is None:
            raise RuntimeError("neurocore: no step to end; run a forward pass of the model first")
        step, self._step = self._step, None
        self._marks.clear()
        return step

    # -- step and tensor bookkeeping -----------------------------------------------------------
    def _on_model_input(self, module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise ValueError("neurocore: the model must be called with the input tensor first")
        x = args[0]
        in_dims = getattr(module, "in_dims", None)
        if in_dims is not None and x.dim() == in_dims + 1:  # event frames [T, B, ...]
            steps, batch, event = x.shape[0], x.shape[1], True
        else:
            steps = self.time_steps or getattr(module, "time_steps", None) or 1
            batch, event = x.shape[0], False
        self._marks.clear()
        self._step = StepCounts(
            batch_size=int(batch),
            time_steps=int(steps),
            event_input=event,
            data_elems=x.numel() // max(int(batch), 1),
            params=dict(self._params),
        )
        self._mark(x, DATA)

    def _mark(self, tensor: Tensor, tag: str) -> None:
        base = tensor._base if tensor._base is not None else tensor
        self._marks[id(base)] = (weakref.ref(base), tag)

    def _tag(self, tensor: Tensor) -> str | None:
        base = tensor._base if tensor._base is not None else tensor
        entry = self._marks.get(id(base))
        return entry[1] if entry is not None and entry[0]() is base else None

    def _layout(self, step: StepCounts, name: str, rows: int) -> tuple[int, bool]:
        """(time steps in the leading dimension, computed once) for a layer fed `rows` rows."""
        if rows == step.time_steps * step.batch_size:
            return step.time_steps, False
        if rows == step.batch_size:
            return 1, True
        raise ValueError(
            f"neurocore: layer {name!r} got {rows} rows; expected T*B = "
            f"{step.time_steps}*{step.batch_size} (time-flattened) or B = {step.batch_size} "
            "(a direct-coded head computed once)"
        )

    def _first_use(self, step: StepCounts, name: str) -> None:
        if name not in step.layer_order:
            step.layer_order.append(name)

    # -- synaptic layers -----------------------------------------------------------------------
    def _synaptic_records(
        self,
        step: StepCounts,
        name: str,
        kind: str,
        steps: int,
        once: bool,
        fp: Tensor,
        *,
        source: str,
        binary: bool,
        in_elems: int,
        out_elems: int,
        weights: int,
        dense: int,
        in_nonzero: Tensor,
    ) -> list[SynapticCounts]:
        self._first_use(step, name)
        fp_steps = fp.view(steps, step.batch_size, -1).sum(2)
        nonzero = in_nonzero.view(steps, -1).sum(1).tolist()
        records = []
        for t in range(steps):
            rec = step.synaptic.get((name, t))
            if rec is None:
                rec = step.synaptic[(name, t)] = SynapticCounts(
                    layer=name,
                    kind=kind,
                    time_step=t,
                    once=once,
                    source=source,
                    binary=binary,
                    in_elems=in_elems,
                    out_elems=out_elems,
                    weights=weights,
                    dense=dense,
                    fp=fp_steps[t],  # a row of a fresh tensor: never modified in place
                    in_nonzero=nonzero[t],
                )
            else:  # the same layer called again within this step
                rec.fp += fp_steps[t]
                rec.in_elems += in_elems
                rec.out_elems += out_elems
                rec.dense += dense
                rec.in_nonzero += nonzero[t]
                rec.binary = rec.binary and binary
            records.append(rec)
        return records

    def _input(self, step: StepCounts, x: Tensor) -> tuple[Tensor, str, bool]:
        """(nonzero mask of x as 0./1. floats, source, binary) of a synaptic layer's input."""
        tag = self._tag(x)
        values = x.detach()
        if tag == SPIKES:  # 0/1 already
            return values, SPIKES, True
        if tag == SPIKE_DERIVED:  # pooled spikes: non-negative
            return values.sign(), SPIKE_DERIVED, False
        lo, hi = (float(v) for v in torch.aminmax(values))
        mask = values.sign()
        if lo < 0:
            mask = mask.abs_()
        binary = lo >= 0 and hi <= 1 and torch.equal(values, mask)
        if tag == DATA or not x.requires_grad:  # the input, or a fixed transform of it
            step.data_binary = binary
            return mask, DATA, binary
        return mask, ACTIVATION, binary

    def _conv_geometry(self, name: str, module: nn.Conv2d, h: int, w: int) -> _ConvGeometry:
        key = (name, h, w)
        geo = self._geometry.get(key)
        if geo is None:
            with torch.enable_grad():  # cover = d sum(box(probe)) / d probe (any padding mode)
                probe = torch.ones(1, 1, h, w, dtype=torch.float64, requires_grad=True)
                inb = _box(module, probe)
                (cover,) = torch.autograd.grad(inb.sum(), probe)
            c_in_g = module.weight.shape[1]
            taps = int(inb.sum())
            # float32 is exact while every partial sum of the matrix-vector product stays an
            # integer below 2**24 (at most C_in/G * taps)
            dtype = torch.float32 if c_in_g * taps < 2**24 else torch.float64
            geo = _ConvGeometry(inb.detach().flatten(), cover.flatten().repeat(c_in_g).to(dtype),
                                taps)
            self._geometry[key] = geo
        return geo

    def _on_conv(self, name: str, module: nn.Conv2d, args: tuple, y: Tensor) -> None:
        step = self._step
        if step is None:
            return
        x = args[0]
        if x.dim() != 4:
            raise ValueError(f"neurocore: conv {name!r} needs [N, C, H, W] input, got {x.shape}")
        n, _, h, w = x.shape
        c_out, c_in_g, _, _ = module.weight.shape
        groups = module.groups
        steps, once = self._layout(step, name, n)
        geo = self._conv_geometry(name, module, h, w)
        mask, source, binary = self._input(step, x)
        flat = mask.reshape(n, groups, c_in_g * h * w).to(geo.cover.dtype)
        # sum over outputs of box(a) = sum over inputs of a * cover (a matrix-vector product)
        fp = (flat @ geo.cover).sum(1).double().mul_(c_out // groups)
        exact = torch.float32 if flat[0].numel() < 2**24 else torch.float64
        nonzero = flat.sum((1, 2), dtype=exact).double()
        records = self._synaptic_records(
            step,
            name,
            "conv",
            steps,
            once,
            fp,
            source=source,
            binary=binary,
            in_elems=x[0].numel(),
            out_elems=y[0].numel(),
            weights=module.weight.numel(),
            dense=c_out * c_in_g * geo.taps,
            in_nonzero=nonzero,
        )
        if y.requires_grad:
            y.register_hook(
                partial(
                    _conv_grad,
                    records,
                    module,
                    x.detach(),  # autograd keeps the conv's input anyway
                    fp,
                    geo,
                    c_in_g,
                    groups,
                    x.requires_grad,
                    module.weight.requires_grad,
                )
            )

    def _on_linear(self, name: str, module: nn.Linear, args: tuple, y: Tensor) -> None:
        step = self._step
        if step is None:
            return
        x = args[0]
        if x.dim() < 2:
            raise ValueError(f"neurocore: linear {name!r} needs batched input, got {x.shape}")
        f_out, f_in = module.weight.shape
        n = x.numel() // f_in
        rows_per_sample = max(n // (step.time_steps * step.batch_size), 1)
        steps, once = self._layout(step, name, n // rows_per_sample)
        mask, source, binary = self._input(step, x)
        nonzero = mask.sum(-1).reshape(n).double()
        records = self._synaptic_records(
            step,
            name,
            "linear",
            steps,
            once,
            nonzero * f_out,
            source=source,
            binary=binary,
            in_elems=f_in * rows_per_sample,
            out_elems=f_out * rows_per_sample,
            weights=module.weight.numel(),
            dense=f_out * f_in * rows_per_sample,
            in_nonzero=nonzero,
        )
        if y.requires_grad:
            y.register_hook(
                partial(_linear_grad, records, nonzero, f_in, x.requires_grad,
                        module.weight.requires_grad)
            )

    # -- element-wise layers -------------------------------------------------------------------
    def _element_records(
        self, step: StepCounts, name: str, kind: str, steps: int, once: bool, x: Tensor, y: Tensor
    ) -> list[ElementCounts]:
        self._first_use(step, name)
        rows = steps * step.batch_size
        in_elems, out_elems = x.numel() // rows, y.numel() // rows
        records = []
        for t in range(steps):
            rec = step.elements.get((name, t))
            if rec is None:
                rec = ElementCounts(name, kind, t, once, in_elems, out_elems)
                step.elements[(name, t)] = rec
            rec.fp_calls += 1
            records.append(rec)
        if y.requires_grad:
            y.register_hook(partial(_count_backward, records))
        return records

    def _on_neuron(self, name: str, module: LIF, args: tuple, spikes: Tensor) -> None:
        step = self._step
        if step is None:
            return
        x = args[0]
        if x.dim() < 2 or x.shape[0] != step.time_steps or x.shape[1] != step.batch_size:
            raise ValueError(
                f"neurocore: neuron {name!r} needs [T={step.time_steps}, B={step.batch_size}, ...] "
                f"input, got {tuple(x.shape)}"
            )
        records = self._element_records(step, name, "neuron", step.time_steps, False, x, spikes)
        per_step = spikes.detach().reshape(step.time_steps, -1)
        exact = torch.float32 if per_step.shape[1] < 2**24 else torch.float64  # integer sums
        fired = per_step.sum(1, dtype=exact).tolist()
        leak = getattr(module, "decay", 1.0) != 1.0
        for rec, count in zip(records, fired, strict=True):
            rec.spikes += count
            rec.leak = leak
        self._mark(spikes, SPIKES)

    def _on_norm(self, name: str, module: _BatchNorm, args: tuple, y: Tensor) -> None:
        step = self._step
        if step is None:
            return
        x = args[0]
        steps, once = self._layout(step, name, x.shape[0])
        records = self._element_records(step, name, "norm", steps, once, x, y)
        training = module.training or not module.track_running_stats
        has_params = any(p.requires_grad for p in module.parameters(recurse=False))
        for rec in records:
            rec.training, rec.has_params = training, has_params

    def _on_pool(self, name: str, module: nn.Module, args: tuple, y: Tensor) -> None:
        step = self._step
        if step is None:
            return
        x = args[0]
        steps, once = self._layout(step, name, x.shape[0])
        records = self._element_records(step, name, "pool", steps, once, x, y)
        tag = self._tag(x)
        for rec in records:
            rec.in_spikes = tag == SPIKES
        if tag == SPIKES and isinstance(module, MAX_POOLS):
            self._mark(y, SPIKES)  # the max of spikes is a spike
        elif tag in (SPIKES, SPIKE_DERIVED):
            self._mark(y, SPIKE_DERIVED)


# -- helpers (module level so that hooks hold no reference to the tracer) ----------------------
def _box(module: nn.Conv2d, a: Tensor) -> Tensor:
    """Single-channel conv2d of `a` ([N, 1, H, W]) with a ones kernel and the layer's geometry."""
    kh, kw = module.weight.shape[-2:]
    ones = a.new_ones(1, 1, kh, kw)
    if module.padding_mode != "zeros":
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return F.conv2d(a, ones, None, module.stride, 0, module.dilation)
    return F.conv2d(a, ones, None, module.stride, module.padding, module.dilation)


def _dense(dy: Tensor) -> bool:
    """Whether no error is zero (the usual case behind a BatchNorm). A square that underflows
    to 0 only sends the step down the exact masked path."""
    return dy.numel() > 0 and float(torch.mul(dy, dy).amin()) > 0


def _conv_grad(
    records: list[SynapticCounts],
    module: nn.Conv2d,
    x: Tensor,
    fp: Tensor,
    geo: _ConvGeometry,
    c_in_g: int,
    groups: int,
    bp_needed: bool,
    wg_needed: bool,
    dy: Tensor,
) -> None:
    n, c_out = dy.shape[:2]
    dy = dy.detach()
    per_row = dy[0].numel()
    if _dense(dy):  # e = C_out/G everywhere: WG = FP, BP = dense
        bp = fp.new_full((n,), float(c_in_g * c_out * geo.taps))
        _add_backward(records, bp, fp, fp.new_full((n,), float(per_row)), per_row,
                      bp_needed, wg_needed)
        return
    c_in, h, w = x.shape[1:]
    a = x.sign().abs_().reshape(n * groups, c_in // groups, h, w).sum(1, keepdim=True)
    s = _box(module, a).view(n, groups, -1)  # [N, G, H'*W'] nonzero inputs per receptive field
    e = dy.sign().abs_().reshape(n, groups, c_out // groups, -1).sum(2)
    wg = (e * s).sum((1, 2), dtype=torch.float64)
    e_all = e.sum(1) if groups > 1 else e[:, 0]
    bp = (e_all.double() @ geo.inb64).mul_(c_in_g)
    _add_backward(records, bp, wg, e_all.sum(1, dtype=torch.float64), per_row,
                  bp_needed, wg_needed)


def _linear_grad(
    records: list[SynapticCounts],
    a: Tensor,
    f_in: int,
    bp_needed: bool,
    wg_needed: bool,
    dy: Tensor,
) -> None:
    dy = dy.detach()
    f_out = dy.shape[-1]
    if _dense(dy):  # every row has F_out nonzero errors
        e = a.new_full(a.shape, float(f_out))
    else:
        e = dy.sign().abs_().sum(-1).reshape(-1).double()
    _add_backward(records, e * f_in, a * e, e, f_out, bp_needed, wg_needed)


def _add_backward(
    records: list[SynapticCounts],
    bp: Tensor,
    wg: Tensor,
    err_nonzero: Tensor,
    err_elems_per_row: int,
    bp_needed: bool,
    wg_needed: bool,
) -> None:
    steps = len(records)
    batch = records[0].fp.numel()
    bp, wg = bp.view(steps, batch, -1).sum(2), wg.view(steps, batch, -1).sum(2)
    nonzero = err_nonzero.view(steps, -1).sum(1).tolist()
    rows_per_sample = err_nonzero.numel() // (steps * batch)
    for t, rec in enumerate(records):
        rec.bp = bp[t] if rec.bp is None else rec.bp + bp[t]
        rec.wg = wg[t] if rec.wg is None else rec.wg + wg[t]
        rec.bp_needed = rec.bp_needed or bp_needed
        rec.wg_needed = rec.wg_needed or wg_needed
        rec.err_elems += err_elems_per_row * rows_per_sample
        rec.err_nonzero += nonzero[t]


def _count_backward(records: list[ElementCounts], _grad: Tensor) -> None:
    for rec in records:
        rec.bp_calls += 1
