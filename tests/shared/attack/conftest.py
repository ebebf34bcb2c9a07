"""Victims the attack tests share (trained once per session) and their test inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.data import load_dataset
from shared.snn import build_model, model_layout


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for first in range(0, len(y), 64):
            idx = order[first : first + 64]
            loss = F.cross_entropy(model(model_layout(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="session")
def image_victim() -> torch.nn.Module:
    """A csnn trained briefly on the 8x8 digits (direct coding)."""
    torch.manual_seed(0)
    model = build_model("csnn", in_channels=1, num_classes=10, input_size=8, time_steps=2,
                        surrogate="sigmoid")
    _train(model, *load_dataset("digits", "train").tensors, epochs=6)
    return model


@pytest.fixture(scope="session")
def event_victim() -> torch.nn.Module:
    """An mlp trained briefly on dvs-digits event frames."""
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=2, num_classes=10, input_size=32, time_steps=8,
                        surrogate="rectangle")
    x, y = load_dataset("dvs-digits", "train").tensors
    _train(model, x[:1200], y[:1200], epochs=3)
    return model


@pytest.fixture
def blind_victim() -> torch.nn.Module:
    """A victim whose logits ignore the input (always class 9): no flip can help an attack."""
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=2, num_classes=10, input_size=32, time_steps=8).eval()
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.copy_(torch.arange(10.0))  # always class 9
    return model


@pytest.fixture
def digits_test():
    """`digits_test(n)` -> the first n digits test images [n, 1, 8, 8] and labels."""

    def first(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_dataset("digits", "test").tensors
        return x[:n], y[:n]

    return first


@pytest.fixture
def correct_event_samples():
    """`correct_event_samples(model, n)` -> n dvs-digits test samples `model` classifies
    correctly, each as (frames [T, 1, C, H, W], label [1])."""

    def pick(model: torch.nn.Module, n: int) -> list[tuple]:
        x, y = load_dataset("dvs-digits", "test").tensors
        with torch.no_grad():
            pred = model(model_layout(x[:60])).argmax(1)
        keep = (pred == y[:60]).nonzero().flatten()[:n].tolist()
        assert len(keep) == n
        return [(x[i].unsqueeze(1), y[i : i + 1]) for i in keep]

    return pick
