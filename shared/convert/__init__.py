"""Dual-phase ANN->SNN conversion (Wang et al. 2022): lossless SNNs at 1-8 time steps.

    from shared.convert import build_ann, to_qc_ann, dual_phase_convert
    qc_ann = to_qc_ann(relu_ann, time_steps=4)          # phase 1: train this (param_groups)
    snn, report = dual_phase_convert(qc_ann, calib_set, time_steps=4)   # convert + phase 2
    logits = snn(images)                                # [B, C, H, W] -> [B, classes]
"""

from .phase2 import ConversionReport, decompose_errors, dual_phase_convert
from .qc import (
    ConvertError,
    QCActivation,
    ResidualBlock,
    build_ann,
    param_groups,
    qc,
    qc_activations,
    to_qc_ann,
)
from .snn import ConvertedBlock, ConvertedSNN, Scale, convert

__all__ = [
    "ConversionReport",
    "ConvertError",
    "ConvertedBlock",
    "ConvertedSNN",
    "QCActivation",
    "ResidualBlock",
    "Scale",
    "build_ann",
    "convert",
    "decompose_errors",
    "dual_phase_convert",
    "param_groups",
    "qc",
    "qc_activations",
    "to_qc_ann",
]
