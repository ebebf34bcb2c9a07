"""An event-camera (DVS) emulator: moving digit images -> binary ON/OFF event frames.

A dynamic vision sensor pixel reports a change of log intensity, not intensity. Each pixel keeps
the log intensity of its last event as a reference; whenever the current log intensity moves a
threshold C away from it, the pixel emits an ON (brighter) or OFF (darker) event and moves its
reference by that many thresholds:

    L_t(p)   = log(I_t(p) + b)                        b = 0.1 (dark current: log(0) is finite)
    n_t(p)   = trunc((L_t(p) - R_{t-1}(p)) / C(p))    signed number of threshold crossings
    ON_t(p)  = n_t(p) >= 1,  OFF_t(p) = n_t(p) <= -1
    R_t(p)   = R_{t-1}(p) + n_t(p) * C(p)             R_0 = L_0

A static image makes no events, so, like N-MNIST's recording setup, the emulator moves each
digit along a saccade path: a closed triangle of three saccades (down-right, left, up-right back
to the start, 2 px per side leg), sampled at T + 1 = 9 evenly spaced points; the image at the
first point only sets the references, the next T give the frames. Sub-pixel positions are
rendered by bilinear interpolation on a 32 x 32 canvas (the 28 x 28 digit centred with a 2 px
border). Per-pixel thresholds C(p) = 0.25 * (1 + 0.05 z(p)), z a fixed standard-normal pattern
(seed 0), model the sensor's fixed-pattern mismatch; the sensor is the same for every sample.

A binary frame records whether a pixel fired at least once in that step, so a sample is
`[T, 2, 32, 32]` float32 in {0, 1} (channel 0 ON, 1 OFF). Everything is deterministic and
vectorised over all images at once (a few seconds for the 5,000 digits of mnist-subset).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIME_STEPS = 8
SIDE = 32
DARK = 0.1  # b: log(I + b) stays finite on black pixels
THRESHOLD = 0.25  # C: log-intensity change per event
MISMATCH = 0.05  # relative std of the per-pixel threshold
AMPLITUDE = 2.0  # pixels per saccade leg (x and y)
_TRIANGLE = ((0.0, 0.0), (1.0, 1.0), (-1.0, 1.0), (0.0, 0.0))  # (dx, dy) vertices, x amplitude


def saccade_path(time_steps: int = TIME_STEPS) -> torch.Tensor:
    """`[time_steps + 1, 2]` (dx, dy) offsets in pixels along the closed three-saccade triangle."""
    vertices = torch.tensor(_TRIANGLE, dtype=torch.float64) * AMPLITUDE
    legs = vertices[1:] - vertices[:-1]
    lengths = legs.norm(dim=1)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), lengths.cumsum(0)])
    points = []
    for s in torch.linspace(0, float(cumulative[-1]), time_steps + 1, dtype=torch.float64):
        leg = min(int(torch.searchsorted(cumulative, s, right=True)) - 1, len(legs) - 1)
        frac = (s - cumulative[leg]) / lengths[leg]
        points.append(vertices[leg] + frac * legs[leg])
    return torch.stack(points)


def pixel_thresholds(side: int = SIDE) -> torch.Tensor:
    """`[side, side]` per-pixel log-intensity thresholds C(p) of the emulated sensor (fixed)."""
    z = torch.randn(side, side, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (THRESHOLD * (1 + MISMATCH * z)).clamp_min(THRESHOLD / 2)


def _render(canvas: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """`canvas` `[N, 1, S, S]` moved by (dx, dy) pixels with bilinear interpolation, zero fill."""
    n, _, side, _ = canvas.shape
    # affine_grid works in [-1, 1] coordinates: a shift of d pixels is 2 d / side.
    theta = canvas.new_tensor([[1.0, 0.0, -2 * dx / side], [0.0, 1.0, -2 * dy / side]])
    grid = F.affine_grid(theta.expand(n, 2, 3), list(canvas.shape), align_corners=False)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def emulate_events(images: torch.Tensor, time_steps: int = TIME_STEPS) -> torch.Tensor:
    """Event frames `[N, time_steps, 2, 32, 32]` float32 in {0, 1} of images `[N, 1, 28, 28]`
    with intensities in [0, 1] (see the module docstring for the sensor model)."""
    if images.dim() != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"expected images [N, 1, 28, 28], got {tuple(images.shape)}")
    pad = (SIDE - 28) // 2
    canvas = F.pad(images.to(torch.float64), (pad, pad, pad, pad))
    threshold = pixel_thresholds().to(canvas.dtype)
    path = saccade_path(time_steps).tolist()
    out = torch.zeros(len(images), time_steps, 2, SIDE, SIDE, dtype=torch.float32)
    reference = torch.log(_render(canvas, *path[0])[:, 0] + DARK)
    for t, (dx, dy) in enumerate(path[1:]):
        level = torch.log(_render(canvas, dx, dy)[:, 0] + DARK)
        crossings = torch.trunc((level - reference) / threshold)
        out[:, t, 0] = crossings >= 1
        out[:, t, 1] = crossings <= -1
        reference = reference + crossings * threshold
    return out


def event_density(frames: torch.Tensor) -> float:
    """Fraction of entries of binary frames that hold an event."""
    return float(frames.mean()) if frames.numel() else math.nan
