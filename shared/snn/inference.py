"""Inference with a spiking model: class predictions and the loss / accuracy loop that the server
and the clients run every round, on samples in dataset layout (`[N, C, H, W]` images for direct
coding, `[N, T, C, H, W]` event frames)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .models import model_layout


def dataset_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a dataset: a TensorDataset's own tensors, anything else stacked sample by
    sample."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)  # type: ignore[arg-type]
    return torch.stack(xs), torch.as_tensor(ys)


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
    x_all, y_all = dataset_tensors(dataset)
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


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class predictions of `model` in eval mode for samples `x` ([N, ...] dataset layout)."""
    was_training = model.training
    model.eval()
    try:
        out = [model(model_layout(x[i : i + batch_size])).argmax(1)
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


