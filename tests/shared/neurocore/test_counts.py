"""shared.neurocore.counts: the tracer's exact op counts against brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from shared.neurocore import ChipConfig, NeuroCore
from shared.quant import quantize
from shared.snn import build_model

PAPER = ChipConfig.preset("paper-28nm-fp16")


@pytest.mark.parametrize(
    ("name", "input_size", "neuron"),
    [("csnn", 12, "lif"), ("mlp", 8, "if"), ("resnet-mini", 8, "lif")],
)
def test_counts_equal_brute_force_on_zoo_models(
    name, input_size, neuron, profile_with_brute, rand_batch
):
    torch.manual_seed(1)
    model = build_model(name, in_channels=1, num_classes=10, input_size=input_size,
                        time_steps=3, neuron=neuron, threshold=0.5)
    x = rand_batch((5, 1, input_size, input_size))
    y = torch.arange(5) % 10
    report, got, expected = profile_with_brute(model, x, y)
    assert got == expected
    phases = {p for (_, p, _) in got}
    assert phases == {"fp", "bp", "wg"}
    # the direct-coded head is counted once (t = 0); the body at every step
    assert {t for (layer, _, t) in got if layer in report.meta["counted_once"]} == {0}
    assert {t for (layer, _, t) in got if layer not in report.meta["counted_once"]} == {0, 1, 2}
    assert not any(layer == "conv1" or layer == "fc1" for (layer, p, _) in got if p == "bp")


def test_counts_equal_brute_force_on_event_frames_and_quantized_model(
    profile_with_brute, rand_batch
):
    torch.manual_seed(2)
    model = quantize(build_model("csnn", in_channels=2, num_classes=10, input_size=8,
                                 time_steps=4, threshold=0.5), bits=4)
    x = (rand_batch((4, 3, 2, 8, 8), seed=3) > 0.7).float()  # [T, B, C, H, W] binary events
    y = torch.arange(3)
    report, got, expected = profile_with_brute(model, x, y)
    assert got == expected
    assert report.meta["counted_once"] == []  # event frames: every layer per step
    assert {t for (_, _, t) in got} == {0, 1, 2, 3}


class _ScaledConv(nn.Conv2d):  # a subclass that changes the effective weight, not its shape
    def forward(self, x):
        return self._conv_forward(x, self.weight * 0.5, self.bias)


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    side=st.integers(5, 9),
    density=st.floats(0.05, 1.0),
    mode=st.sampled_from(["zeros", "zeros", "reflect"]),
    seed=st.integers(0, 10_000),
)
def test_factorised_conv_counts_equal_brute_force(kernel, stride, padding, dilation, groups, side,
                                                   density, mode, seed, profile_with_brute):
    if mode == "reflect" and padding >= side:
        mode = "zeros"
    assume(side + 2 * padding - dilation * (kernel - 1) >= 1)  # at least one output position
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = _ScaledConv(4, 6, kernel, stride=stride, padding=padding, dilation=dilation,
                       groups=groups, padding_mode=mode)
    side_out = (side + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # makes the second layer's input need a gradient
        conv,
        nn.Flatten(),
        nn.Linear(6 * side_out**2, 5),
    )
    with torch.no_grad():  # sparse weights: zeros in the activations and in the errors
        for layer in (model[0], model[3]):
            keep = torch.rand(layer.weight.shape, generator=gen) < density
            layer.weight.copy_(torch.where(keep, layer.weight, 0.0))
    x = (torch.rand(3, 2, side, side, generator=gen) < density).float()
    target = torch.randn(3, 5, generator=gen) * (torch.rand(3, 5, generator=gen) < density)
    _, got, expected = profile_with_brute(
        model, x, target, loss_fn=lambda out, t: (out * t).sum(), time_steps=1
    )
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}


def test_density_one_reproduces_the_dense_count():
    torch.manual_seed(0)
    for layer, shape in (
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 9)),
        (nn.Conv2d(2, 4, (3, 5), padding=(2, 1), dilation=(1, 2)), (4, 2, 8, 10)),
        (nn.Linear(7, 3), (4, 7)),
    ):
        x = torch.ones(shape, requires_grad=True)  # binary input of density 1
        model = nn.Sequential(layer)
        counts, _ = NeuroCore(PAPER).trace(
            model, x, None, loss_fn=lambda out, _: (out * torch.linspace(1, 2, out.numel())
                                                    .view(out.shape)).sum(), time_steps=1)
        (rec,) = counts.synaptic.values()
        batch_size = shape[0]
        if isinstance(layer, nn.Conv2d):
            ones = torch.ones(layer.weight.shape, dtype=torch.float64)
            dense = F.conv2d(torch.ones(shape, dtype=torch.float64), ones, None, layer.stride,
                             layer.padding, layer.dilation).sum()
        else:
            dense = torch.tensor(float(layer.weight.numel() * batch_size))
        assert rec.dense * batch_size == int(dense)
        for phase in (rec.fp, rec.bp, rec.wg):
            assert int(phase.sum()) == int(dense)
        assert rec.binary and rec.bp_needed
