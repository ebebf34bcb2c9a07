"""Evaluation of a (global) model on a dataset: loss and accuracy.

`spikefed-evaluate` (integer engine, conversion sweep, attacks, energy) builds on this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from shared.snn import model_layout


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)  # type: ignore[arg-type]
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, dataset: Dataset, batch_size: int = 500
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (0..1) of `model` in eval mode over `dataset`.

    Samples are `[C, H, W]` images (direct coding) or `[T, C, H, W]` event frames; event batches are
    moved to the model's `[T, B, ...]` layout. The model's train/eval mode is restored afterwards.
    """
    x_all, y_all = _tensors(dataset)
    if len(y_all) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(y_all), batch_size):
            x = model_layout(x_all[start : start + batch_size])
            y = y_all[start : start + batch_size]
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return loss_sum / len(y_all), correct / len(y_all)
