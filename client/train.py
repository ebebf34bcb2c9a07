"""The local trainer: BPTT with surrogate gradients on one node's partition."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from shared.convert import param_groups
from shared.neurocore import Accountant, ChipConfig
from shared.quant.integer_training import TrainPrecision
from shared.snn import model_layout


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training cross-entropy over the last epoch
    accuracy: float  # training accuracy over the last epoch (0..1)
    num_examples: int  # samples in the partition
    seconds: float
    # The neuromorphic chip's account of every training step (all epochs); zero without a chip.
    energy_j: float = 0.0
    cycles: int = 0
    dram_bytes: int = 0
    spike_density: float | None = None  # spikes / neuron-steps over the training steps


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """Adam or SGD; a QC-ANN's thresholds get a parameter group of their own (no weight decay)."""
    groups = param_groups(model)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adam' or 'sgd'")


def train_local(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    chip: ChipConfig | None = None,
    train_precision: str = "float",
) -> TrainResult:
    """Train `model` in place for `epochs` over `data` (shuffled by `seed`).

    With `proximal_mu > 0` the FedProx term mu/2 * ||w - w_global||^2 is added to the loss, w_global
    being the weights the model had on entry (the global model it was sent). With a `chip`, every
    step is counted from its own tensors and costed on that neuromorphic chip (`shared.neurocore`;
    no extra forward or backward pass). `train_precision` ("float", "fp16", "int8") is the
    arithmetic of the backward pass and the update (`shared.quant.integer_training`): int8 rounds
    every error and weight gradient to int8 codes with power-of-two scales and stochastic rounding
    (seeded by `seed`) and keeps the weights as int8 codes; the chip accounts the steps at that
    precision (`ChipConfig.for_training`: a preset that specifies another says so in its report).
    """
    x_all, y_all = data.tensors
    n = len(y_all)
    if n == 0:
        raise ValueError("this node's partition is empty; use fewer partitions or another seed")
    opt = make_optimizer(model, optimizer, lr)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    loss_sum, correct = 0.0, 0
    accountant = (Accountant(chip, model, train_precision=train_precision)
                  if chip is not None else None)
    # entered after the accountant, so the chip's counters see the rounded errors
    rounding = TrainPrecision(train_precision, model, seed=seed)
    with accountant or nullcontext(), rounding:
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            order = torch.randperm(n, generator=generator)
            for first in range(0, n, batch_size):
                idx = order[first : first + batch_size]
                if len(idx) == 1 and n > 1:
                    continue  # BatchNorm cannot normalise a batch of one
                x, y = model_layout(x_all[idx]), y_all[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if anchor is not None:
                    params = zip(model.parameters(), anchor, strict=True)
                    prox = sum((p - a).square().sum() for p, a in params)
                    loss = loss + proximal_mu / 2 * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                rounding.after_backward()
                opt.step()
                rounding.after_step()
                if accountant is not None:
                    accountant.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y).sum())
    seconds = time.perf_counter() - start
    if accountant is None:
        return TrainResult(loss_sum / n, correct / n, n, seconds)
    total = accountant.total
    return TrainResult(
        loss_sum / n,
        correct / n,
        n,
        seconds,
        energy_j=total.energy_j,
        cycles=total.cycles,
        dram_bytes=total.dram_bytes,
        spike_density=total.spike_density,
    )
