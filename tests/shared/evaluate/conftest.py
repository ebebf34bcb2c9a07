"""A small trained checkpoint, saved as the server does, for the pipeline and command tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.checkpoint import save_checkpoint
from shared.config import RunConfig
from shared.data import load_dataset
from shared.rebuild import build_from_spec
from shared.snn import federated_state, model_layout


def _train_checkpoint(path, *, weight_bits: int = 4, steps: int = 60, dataset: str = "digits",
                      train_mode: str = "snn"):
    """A csnn trained for a few dozen steps (far above chance), saved as the server does."""
    config = RunConfig.parse({"dataset": dataset, "weight-bits": weight_bits, "time-steps": 2,
                              "train-mode": train_mode})
    spec = config.model_spec()
    torch.manual_seed(0)
    model = build_from_spec(spec).train()
    x, y = load_dataset(dataset, "train").tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model(model_layout(x[idx])), y[idx]).backward()
        opt.step()
    return save_checkpoint(path, federated_state(model), {
        "round": 1, "model": spec, "dataset": dataset, "config": config.to_flwr()})


@pytest.fixture(scope="session")
def train_checkpoint():
    """`train_checkpoint(path, weight_bits=4, steps=60, dataset="digits", train_mode="snn")`."""
    return _train_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A 4-bit csnn on digits, trained 60 steps (shared by every test of the package)."""
    return _train_checkpoint(tmp_path_factory.mktemp("ckpt") / "round-001.safetensors")
