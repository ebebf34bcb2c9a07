"""Shift-BN integer quantization of spiking nets: fake-quant QAT, integer export, integer engine.

The lifecycle has three visible stages, as in torch.ao:

    qat = quantize(build_model("csnn", ...), bits=4)    # train as usual (float shadow weights)
    engine = to_integer(qat)                            # integers only: codes, shifts, thresholds
    logits = engine(x_uint8) * engine.output_scale      # == qat.eval()(x_uint8 / 255), exactly

The same power-of-two quantizer (`pow2_codes`) compresses the clients' weight updates for the
uplink (`shared.quant.update`: per-tensor scale, `update-bits` packed codes).

`TrainPrecision` (`shared.quant.integer_training`, run-config `train-precision`) trains in the
chip's arithmetic: int8 errors, weight gradients and shadow weights with power-of-two scales and
stochastic rounding (or fp16), instead of float32 shadow weights.
"""

from .engine import IntegerModel, load_integer, save_integer, to_integer
from .fake import (
    QLIF,
    QConv2d,
    QLinear,
    QuantError,
    fake_quant_weight,
    pow2_codes,
    weight_codes,
)
from .integer_training import TRAIN_PRECISIONS, TrainPrecision, quantize_sr, stochastic_round
from .qat import QuantizedMixin, fold_readout, fold_spiking, quantize

__all__ = [
    "IntegerModel",
    "QConv2d",
    "QLIF",
    "QLinear",
    "QuantError",
    "QuantizedMixin",
    "TRAIN_PRECISIONS",
    "TrainPrecision",
    "fake_quant_weight",
    "fold_readout",
    "fold_spiking",
    "load_integer",
    "pow2_codes",
    "quantize",
    "quantize_sr",
    "save_integer",
    "stochastic_round",
    "to_integer",
    "weight_codes",
]
