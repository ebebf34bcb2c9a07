"""Multi-step integrate-and-fire neurons over a whole time window.

For input current x[t] (t = 1..T) and membrane potential v (v[0] = v_init):

    h[t] = decay * v[t-1] + x[t]                   charge (IF: decay = 1; LIF: decay = 1 - 2**-k)
    s[t] = H(h[t] - threshold)                     fire (exact step forward, surrogate backward)
    v[t] = h[t] - threshold * s[t]                 reset by subtraction, or
    v[t] = h[t] * (1 - s[t])                       reset to zero

`h` is the membrane potential the neuron compares with its threshold; it is what
`record_membrane` exposes (PDSG attacks and the chip model read it).

The time loop is the training hot path. For registry surrogates the whole loop over T is one
autograd Function: the forward runs T elementwise steps without building a graph, keeps only
h (spikes are re-derived from it), and the backward runs the reverse-time recurrence

    dL/dh[t] = (dL/ds[t] + dv/ds * dL/dv[t]) * g(h[t] - threshold) + dv/dh * dL/dv[t]
    dL/dv[t-1] = decay * dL/dh[t],   dL/dx[t] = dL/dh[t]

with g the surrogate's pseudo-derivative evaluated for all T at once. With `detach_reset` (the
default) the reset is treated as a constant in the backward pass (dv/ds = 0), as in snnTorch.
A surrogate given as an arbitrary callable falls back to `multistep_reference`, the plain
step-by-step autograd loop that also serves as the tests' reference.

Quantized errors (`train-precision` fp16 / int8, `shared.quant.integer_training`): a neuron whose
`error_quantizer` is set rounds dL/dh[t] in place at every step of the backward recurrence, before
it is carried to step t - 1 and passed to the input, so the carry is the rounded error, as on a chip
that stores errors at that precision. When it is None (float training) the backward is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .surrogate import SpikeFn, Surrogate, get_surrogate

Reset = Literal["subtract", "zero"]
ErrorQuantizer = Callable[[Tensor], Tensor]  # rounds one step's dL/dh in place and returns it


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the incoming gradient with `quantizer` (a copy)."""

    @staticmethod
    def forward(ctx, x: Tensor, quantizer: ErrorQuantizer) -> Tensor:  # type: ignore[override]
        ctx.quantizer = quantizer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.quantizer(grad.clone()), None


def round_gradient(x: Tensor, quantizer: ErrorQuantizer) -> Tensor:
    """`x` unchanged; in the backward pass the gradient that reaches it is rounded by `quantizer`
    (given a copy it may overwrite)."""
    return _QuantizeGrad.apply(x, quantizer)


class _MultiStepNeuron(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_seq: Tensor,
        v_init: Tensor,
        decay: float,
        threshold: float,
        subtract: bool,
        detach_reset: bool,
        surrogate: Surrogate,
        quantizer: ErrorQuantizer | None = None,
    ) -> tuple[Tensor, Tensor]:
        steps = x_seq.shape[0]
        h_seq = torch.empty(x_seq.shape, dtype=x_seq.dtype, device=x_seq.device)
        s_seq = torch.empty_like(h_seq)
        v = v_init * decay  # the decayed potential carried into the next step
        v_buf = torch.empty_like(h_seq[0]) if steps > 1 else None
        for t in range(steps):
            h = torch.add(v, x_seq[t], out=h_seq[t])
            s = torch.ge(h, threshold, out=s_seq[t])  # float spikes straight into the output
            if t + 1 < steps:
                if subtract:
                    v = torch.sub(h, s, alpha=threshold, out=v_buf)
                else:
                    v = h.masked_fill(h >= threshold, 0)
                if decay != 1.0:
                    v.mul_(decay)
        ctx.save_for_backward(h_seq)
        ctx.v_init_shape = v_init.shape
        ctx.config = (decay, threshold, subtract, detach_reset, surrogate)
        ctx.quantizer = quantizer
        ctx.mark_non_differentiable(h_seq)
        ctx.set_materialize_grads(False)  # no zero-filled [T, ...] gradient for h_seq
        return s_seq, h_seq

    @staticmethod
    def backward(ctx, grad_s: Tensor | None, _grad_h: Tensor | None):  # type: ignore[override]
        if grad_s is None:  # the spikes were not used
            return None, None, None, None, None, None, None, None
        (h_seq,) = ctx.saved_tensors
        decay, threshold, subtract, detach_reset, surrogate = ctx.config
        quantizer = ctx.quantizer
        if quantizer is not None and detach_reset:
            # the same recurrence, dL/dh[t] rounded before it is carried to t - 1
            grad_x = surrogate.grad_mul_(h_seq - threshold, grad_s)
            last = h_seq.shape[0] - 1
            quantizer(grad_x[last])
            for t in reversed(range(last)):
                if subtract:
                    grad_x[t].add_(grad_x[t + 1], alpha=decay)
                else:
                    carry = grad_x[t + 1] * decay if decay != 1.0 else grad_x[t + 1]
                    grad_x[t].add_(carry.masked_fill(h_seq[t] >= threshold, 0))
                quantizer(grad_x[t])
        elif detach_reset:
            # dL/dh[t] = dL/ds[t] g[t] + decay dL/dh[t+1] (times 1 - s[t] for reset to zero),
            # accumulated in place in the buffer that held h - threshold.
            grad_x = surrogate.grad_mul_(h_seq - threshold, grad_s)
            for t in reversed(range(h_seq.shape[0] - 1)):
                if subtract:
                    grad_x[t].add_(grad_x[t + 1], alpha=decay)
                else:
                    carry = grad_x[t + 1] * decay if decay != 1.0 else grad_x[t + 1]
                    grad_x[t].add_(carry.masked_fill(h_seq[t] >= threshold, 0))
        else:
            sg = surrogate.grad_(h_seq - threshold)  # g(h - threshold), all T at once
            grad_x = torch.empty_like(h_seq)
            grad_v = None  # dL/dv[t]
            for t in reversed(range(h_seq.shape[0])):
                gh = grad_s[t] * sg[t]
                if grad_v is not None:
                    h = h_seq[t]
                    if subtract:  # v = h - threshold s
                        gh = gh - threshold * grad_v * sg[t] + grad_v
                    else:  # v = h (1 - s)
                        gh = gh - grad_v * h * sg[t] + grad_v.masked_fill(h >= threshold, 0)
                if quantizer is not None:
                    gh = quantizer(gh.clone())
                grad_x[t] = gh
                grad_v = gh * decay
        grad_v_init = None
        if ctx.needs_input_grad[1]:
            grad_v_init = (grad_x[0] * decay).sum_to_size(ctx.v_init_shape)
        return grad_x, grad_v_init, None, None, None, None, None, None


def multistep_reference(
    x_seq: Tensor,
    spike_fn: SpikeFn,
    *,
    decay: float = 1.0,
    threshold: float = 1.0,
    reset: Reset = "subtract",
    v_init: float | Tensor = 0.0,
    detach_reset: bool = True,
    error_quantizer: ErrorQuantizer | None = None,
) -> tuple[Tensor, Tensor]:
    """The plain loop: one autograd graph per step. Returns (spikes, membrane h), both [T, ...].

    With `error_quantizer`, dL/dh[t] is rounded by it at every step (what the fused backward does).
    """
    v: Tensor | float = v_init
    spikes, membrane = [], []
    for t in range(x_seq.shape[0]):
        h = decay * v + x_seq[t]
        if error_quantizer is not None:
            h = round_gradient(h, error_quantizer)
        s = spike_fn(h - threshold)
        s_reset = s.detach() if detach_reset else s
        v = h - threshold * s_reset if reset == "subtract" else h * (1 - s_reset)
        spikes.append(s)
        membrane.append(h.detach())
    return torch.stack(spikes), torch.stack(membrane)


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire neuron: `[T, B, ...]` current in, spikes out.

    Args:
        decay: membrane decay per step (beta); 1 - 2**-k makes the leak an arithmetic shift by k.
        threshold: firing threshold.
        reset: "subtract" (keep the overshoot) or "zero".
        v_init: initial membrane potential, a float or a tensor broadcastable to `[B, ...]`
            (a Parameter here is trained by BPTT).
        surrogate: registry name or a callable `fn(v_minus_threshold) -> spikes`.
        detach_reset: treat the reset as a constant in the backward pass.

    Set `record_membrane = True` to keep the last forward's membrane potentials `h` in
    `self.membrane` (`[T, B, ...]`, detached); when False nothing is stored. Set
    `error_quantizer` to round dL/dh of every step in the backward pass (module docstring).
    """

    def __init__(
        self,
        decay: float = 0.5,
        threshold: float = 1.0,
        reset: Reset = "subtract",
        v_init: float | Tensor = 0.0,
        surrogate: str | SpikeFn = "atan",
        detach_reset: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if reset not in ("subtract", "zero"):
            raise ValueError(f"reset must be 'subtract' or 'zero', got {reset!r}")
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.reset = reset
        self.v_init = v_init
        self.surrogate = get_surrogate(surrogate)
        self.detach_reset = detach_reset
        self.record_membrane = False
        self.membrane: Tensor | None = None
        self.error_quantizer: ErrorQuantizer | None = None

    def forward(self, x_seq: Tensor) -> Tensor:
        if isinstance(self.surrogate, Surrogate):
            v_init = self.v_init
            if not isinstance(v_init, Tensor):
                v_init = x_seq.new_full((), v_init)
            spikes, membrane = _MultiStepNeuron.apply(
                x_seq,
                v_init,
                self.decay,
                self.threshold,
                self.reset == "subtract",
                self.detach_reset,
                self.surrogate,
                self.error_quantizer,
            )
        else:
            spikes, membrane = multistep_reference(
                x_seq,
                self.surrogate,
                decay=self.decay,
                threshold=self.threshold,
                reset=self.reset,
                v_init=self.v_init,
                detach_reset=self.detach_reset,
                error_quantizer=self.error_quantizer,
            )
        self.membrane = membrane if self.record_membrane else None
        return spikes

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, threshold={self.threshold}, reset={self.reset!r}, "
            f"surrogate={self.surrogate!r}"
        )


class IF(LIF):
    """Multi-step integrate-and-fire neuron (no leak): LIF with decay = 1."""

    def __init__(
        self,
        threshold: float = 1.0,
        reset: Reset = "subtract",
        v_init: float | Tensor = 0.0,
        surrogate: str | SpikeFn = "atan",
        detach_reset: bool = True,
    ) -> None:
        super().__init__(1.0, threshold, reset, v_init, surrogate, detach_reset)


def spiking_neurons(model: nn.Module) -> list[tuple[str, LIF]]:
    """The (name, module) pairs of every spiking neuron in `model`, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]


@torch.no_grad()
def spike_density(model: nn.Module, x: Tensor) -> float:
    """Fraction of neuron-steps that fired on input `x` (spikes / (neurons x T x batch))."""
    counts = [0.0, 0]

    def hook(_module: nn.Module, _inputs: tuple[Tensor], spikes: Tensor) -> None:
        counts[0] += float(spikes.sum())
        counts[1] += spikes.numel()

    handles = [m.register_forward_hook(hook) for _, m in spiking_neurons(model)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts[0] / counts[1] if counts[1] else 0.0
