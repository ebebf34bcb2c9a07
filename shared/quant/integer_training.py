"""Training in the chip's arithmetic: `train-precision` = float | fp16 | int8.

A training chip (Li et al. 2024) computes three kinds of tensors in the backward pass and update:
the errors its BP engine propagates, the weight gradients its WG engine accumulates, and the
weights the update writes back. `TrainPrecision` rounds exactly these tensors of a client's
training step to the chip's arithmetic, so that the chip model accounts a step that ran:

    errors     e = dL/dh[t] of every spiking layer and time step (inside the fused neuron's
               backward, `LIF.error_quantizer`) and e = dL/dy of every synaptic layer's output y
               (conv / linear: the error its BP and WG engines consume)
    gradients  g = dL/dp of every parameter, after the backward pass
    weights    p after every optimizer step (the shadow weights QAT fake-quantizes in the forward)

int8 (integer training after NITI, Wang et al. 2022, and WAGEUBN, Yang et al. 2020), q = 127:

    k      = ceil(log2(max|x| / q))                power-of-two scale 2**k: per tensor for errors
                                                   (one per layer and time step in the neurons),
                                                   per output channel for gradients and weights
    x_int  = clamp(SR(x / 2**k), -q, q)            SR(x) = floor(x + U), U ~ uniform[0, 1) (16
    x     <- x_int * 2**k                          random bits): E[SR(x)] = x to within 2**-17 of
                                                   a code, and |x_int| <= q always

    shadow weights: p = w_int * 2**k_c with int8 codes w_int; an optimizer step's float update u
    is applied as w_int' = SR((w_int * 2**k_c + u) / 2**k_c'), k_c' re-derived from max|p + u|
    (the scale follows the weights' range), so every stored weight is an int8 code times a shift.

Float state, by design: the optimizer's moments (Adam m, v; SGD momentum) are float32 and computed
from the int8 gradients; BatchNorm's running statistics and batch statistics, the loss and its
softmax gradient (before the first error is rounded) are float32. Products of int8 codes (errors
x weight codes, errors x spikes or pixel codes) are carried out on float32 tensors holding
integers: exact while every accumulator stays below 2**24 in magnitude (an int32 accumulator
beyond that). The QAT forward keeps its own quantizer (`weight-bits` codes of the shadow weights).

fp16: the same tensors rounded to the nearest half-precision value (`Tensor.half()`), weights
stored as fp16 values. float: nothing is attached and the training step is unchanged.

    with TrainPrecision("int8", model, seed=0) as rounding:
        loss.backward(); rounding.after_backward(); opt.step(); rounding.after_step()
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shared.snn import LIF
from shared.snn.neuron import round_gradient

Precision = Literal["float", "fp16", "int8"]
TRAIN_PRECISIONS: tuple[str, ...] = ("float", "fp16", "int8")
INT8_MAX = 127
SYNAPTIC = (nn.Conv2d, nn.Linear)


def pow2_exponent(max_abs: Tensor, qmax: int) -> Tensor:
    """The smallest k with max_abs / 2**k <= qmax (elementwise; 0 maps to a tiny scale)."""
    max_abs = max_abs.clamp_min(2.0**-100)
    k = torch.ceil(torch.log2(max_abs / qmax))
    return k + (max_abs > qmax * torch.exp2(k)).to(k.dtype)  # log2's rounding, one step up


NOISE_BITS = 16  # resolution of the rounding noise U


def uniform_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
                  ) -> Tensor:
    """Raw rounding noise: int16 words r, uniform over all 2**16 values (one 64-bit draw of the
    generator gives four), so that U = (r + 2**15 + 1/2) / 2**16 is uniform on the midpoints of
    2**16 equal bins of [0, 1)."""
    n = 1
    for d in shape:
        n *= d
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), 2**63 - 1, generator=generator)
    return words.view(torch.int16)[:n].view(shape)


def stochastic_round_(y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """y <- floor(y + U) in place (U as in `uniform_noise`): integers with E[result] = y to within
    2**-17 (the noise's resolution; a hardware rounder uses a few random bits the same way)."""
    y.add_(uniform_noise(y.shape, generator), alpha=2.0**-NOISE_BITS)
    return y.add_(0.5 + 2.0 ** -(NOISE_BITS + 1)).floor_()


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """floor(x + U) (a new tensor): integer-valued, E[result] = x (see `stochastic_round_`)."""
    return stochastic_round_(x.detach().clone(), generator)


def quantize_sr(
    x: Tensor, bits: int = 8, *, per_channel: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(codes, k): stochastic-rounding codes of `x` in [-(2**(bits-1) - 1), 2**(bits-1) - 1] (a
    float tensor of integers) and the power-of-two exponents k, per output channel (dim 0) with
    `per_channel`, else one (0-d), so that x ~ codes * 2**k (unbiased)."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach()
    if per_channel and x.dim() > 1:
        k = pow2_exponent(x.abs().flatten(1).amax(1), qmax)
        inv_scale = torch.exp2(-k).view(-1, *([1] * (x.dim() - 1)))
    else:
        lo, hi = torch.aminmax(x)
        k = pow2_exponent(torch.maximum(-lo, hi), qmax)
        inv_scale = torch.exp2(-k)
    codes = stochastic_round_(x * inv_scale, generator)
    return codes.clamp_(-qmax, qmax), k


class TrainPrecision:
    """Rounds a model's errors, gradients and weights to `precision` while attached.

    Args:
        precision: "float" (nothing attached), "fp16" or "int8".
        model: the model being trained (its conv / linear outputs and LIF neurons get hooks).
        seed: seeds the stochastic rounding (its own generator: the run stays reproducible and
            torch's global generator is not touched).
        quantize: False switches every rounding off while keeping the same code path (the
            int8 path then computes exactly what float training computes; a test checks it).

    Use as a context manager around the training loop; call `after_backward()` after each
    backward pass and `after_step()` after each optimizer step. `codes` holds the int8 codes and
    exponents of every parameter after the last int8 update (name -> (int8 codes, k)).
    """

    def __init__(
        self, precision: str, model: nn.Module, *, seed: int = 0, quantize: bool = True
    ) -> None:
        if precision not in TRAIN_PRECISIONS:
            raise ValueError(
                f"train precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}"
            )
        self.precision = precision
        self.model = model
        self.quantize = quantize
        self.generator = torch.Generator().manual_seed(int(seed) % 2**63)
        self.codes: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        self._neurons: list[LIF] = []

    # -- the three roundings ---------------------------------------------------------------------
    def round_error_(self, e: Tensor) -> Tensor:
        """Round one error tensor in place (one power-of-two scale for all of it) and return it."""
        if not self.quantize or self.precision == "float":
            return e
        if self.precision == "fp16":
            return e.copy_(e.half())
        return self._int8_(e, e)

    def _int8_(self, e: Tensor, out: Tensor | None) -> Tensor:
        """SR int8 codes of `e` times their scale, written into `out` (None: a new tensor)."""
        lo, hi = torch.aminmax(e)
        k = pow2_exponent(torch.maximum(-lo, hi), INT8_MAX)
        y = e.mul_(torch.exp2(-k)) if out is not None else e * torch.exp2(-k)
        stochastic_round_(y, self.generator).clamp_(-INT8_MAX, INT8_MAX)
        return y.mul_(torch.exp2(k))

    def _round_grad(self, g: Tensor) -> Tensor:
        if self.precision == "fp16":
            return g.half().to(g.dtype)
        codes, k = quantize_sr(g, 8, per_channel=True, generator=self.generator)
        return codes * _channel_scale(k, g.dim())

    def after_backward(self) -> None:
        """Round every parameter's gradient (int8: SR codes, a scale per output channel)."""
        if not self.quantize or self.precision == "float":
            return
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.copy_(self._round_grad(p.grad))

    def after_step(self) -> None:
        """Apply the optimizer's update to the integer (or fp16) shadow weights."""
        if not self.quantize or self.precision == "float":
            return
        self._round_weights()

    @torch.no_grad()
    def _round_weights(self) -> None:
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if self.precision == "fp16":
                p.copy_(p.half())
                continue
            codes, k = quantize_sr(p, 8, per_channel=True, generator=self.generator)
            p.copy_(codes * _channel_scale(k, p.dim()))
            self.codes[name] = (codes.to(torch.int8), k)

    # -- attaching -------------------------------------------------------------------------------
    def _output_hook(self, _module: nn.Module, _args: tuple, y: Tensor) -> Tensor | None:
        if not y.requires_grad:
            return None
        return round_gradient(y, self.round_error_)

    def attach(self) -> TrainPrecision:
        """Register the error roundings and bring the weights onto the shadow grid (a model sent
        by the server holds averages, which are not int8 codes)."""
        if self.precision == "float":
            return self
        for module in self.model.modules():
            if isinstance(module, SYNAPTIC):
                self._handles.append(module.register_forward_hook(self._output_hook))
            elif isinstance(module, LIF):
                module.error_quantizer = self.round_error_
                self._neurons.append(module)
        if self.quantize:
            self._round_weights()
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for neuron in self._neurons:
            neuron.error_quantizer = None
        self._handles, self._neurons = [], []

    def __enter__(self) -> TrainPrecision:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _channel_scale(k: Tensor, dim: int) -> Tensor:
    scale = torch.exp2(k)
    return scale.view(-1, *([1] * (dim - 1))) if k.dim() == 1 else scale
