"""Real event-camera recordings from local files: N-MNIST and DVS Gesture, framed for the zoo.

Layouts read (nothing is downloaded; `DIR` is the run's `data-dir`):

- `nmnist`: the published N-MNIST `.bin` files (Orchard et al. 2015), extracted as
  `DIR/NMNIST/Train/<digit>/*.bin` and `DIR/NMNIST/Test/<digit>/*.bin` (or `DIR/Train/...`,
  `DIR/Test/...`). Each event is 5 bytes: x (byte 0), y (byte 1), polarity (bit 7 of byte 2,
  1 = ON), a 23-bit timestamp in microseconds (bits 6..0 of byte 2, bytes 3 and 4, big-endian).
  A record with y == 240 is a timestamp-overflow marker: it adds 2**13 us to every later event
  and is not an event. Sensor 34 x 34.
- `dvs-gesture`: IBM DVS Gesture in the layout of tonic (the field's dataset library),
  `DIR/DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy` and `.../ibmGestureTest/...`
  (or `DIR/ibmGestureTrain/...`): each `.npy` is an `[N, 4]` array of events, columns x, y,
  polarity (1 = ON), timestamp in milliseconds; the file name is the class 0..10. Sensor 128 x 128.

The published train / test split is kept (the folders). Each recording becomes `T` binary frames
`[T, 2, S, S]` (channel 0 ON, 1 OFF, as `dvs-digits`), by `Framing`:

- time bins (`mode="time"`): event i at time t goes to bin `floor((t - t_first) * T / (t_last -
  t_first + 1))`, T equal slices of the recording's span; event counts (`mode="count"`): the
  i-th of N events (in time order) goes to bin `floor(i * T / N)`, T slices of equal event count;
- a pixel of a frame is 1 when at least one event of that polarity fell on it in that bin;
- space: coordinates are divided by `f = max(1, sensor // S)` (a binary OR over f x f blocks:
  DVS Gesture's 128 -> 32 is f = 4), then the `ceil(sensor / f)` side is centre-cropped or
  zero-padded to S (N-MNIST's 34 -> 32 drops one pixel on each side).

The formats are decoded with numpy. tonic installs and reads N-MNIST files offline
(`tonic.io.read_mnist_file`; the tests check our decoder against it), but its dataset classes
(`tonic.datasets.NMNIST`, `DVSGesture`) download the archives unless the archive file itself and
at least 100 recordings are present, so they cannot open a directory of extracted recordings
without network access; framing is a few lines of numpy with the exact rule above.

Memory: a split takes N x T x 2 x S x S x 4 bytes as float32 (N-MNIST train at T = 8, S = 32:
3.9 GB); lower `event-frames` or `event-size` for the full set on a small machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from shared.data.errors import DatasetError

NMNIST_SENSOR = 34
GESTURE_SENSOR = 128
GESTURE_CLASSES = 11
_OVERFLOW_Y = 240  # N-MNIST timestamp-overflow marker
_OVERFLOW_US = 2**13
EVENT = np.dtype([("x", np.int64), ("y", np.int64), ("p", np.uint8), ("t", np.int64)])

NMNIST_LAYOUT = ("NMNIST/Train/<digit>/*.bin and NMNIST/Test/<digit>/*.bin (the extracted "
                 "N-MNIST archives; or Train/ and Test/ directly in data-dir)")
GESTURE_LAYOUT = ("DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy and "
                  "DVSGesture/ibmGestureTest/... (tonic's DVS Gesture layout; or ibmGestureTrain/ "
                  "and ibmGestureTest/ directly in data-dir)")


@dataclass(frozen=True)
class Framing:
    """How a recording becomes frames: `frames` (T) bins by `mode`, square frames of `size`."""

    frames: int = 8
    mode: Literal["time", "count"] = "time"
    size: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.frames <= 256:
            raise DatasetError(f"event-frames={self.frames} must be 1..256")
        if self.mode not in ("time", "count"):
            raise DatasetError(f"event-framing={self.mode!r} must be 'time' or 'count'")
        if not 4 <= self.size <= 256 or self.size % 4:
            raise DatasetError(f"event-size={self.size} must be a multiple of 4 in 4..256")


# ---------------------------------------------------------------------------------------------
# decoding

def decode_nmnist(raw: bytes, where: str = "N-MNIST data") -> np.ndarray:
    """Events of one N-MNIST `.bin` file's bytes: a structured array (x, y, p, t in us)."""
    if len(raw) % 5:
        raise DatasetError(f"{where} has {len(raw)} bytes, not a multiple of 5 (5 bytes an "
                           "event): truncated or not an N-MNIST .bin file; re-extract it")
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 5).astype(np.int64)
    y = b[:, 1]
    t = ((b[:, 2] & 0x7F) << 16) | (b[:, 3] << 8) | b[:, 4]
    overflow = y == _OVERFLOW_Y
    t = t + _OVERFLOW_US * np.cumsum(overflow)  # a marker adds 2**13 us from itself on
    keep = ~overflow
    events = np.empty(int(keep.sum()), dtype=EVENT)
    events["x"], events["y"] = b[keep, 0], y[keep]
    events["p"], events["t"] = (b[keep, 2] >> 7).astype(np.uint8), t[keep]
    if len(events) and (events["x"].max() >= NMNIST_SENSOR or events["y"].max() >= NMNIST_SENSOR):
        raise DatasetError(f"{where} has events outside the 34 x 34 N-MNIST sensor: not an "
                           "N-MNIST .bin file; re-extract it")
    return events


def encode_nmnist(events: np.ndarray) -> bytes:
    """The `.bin` bytes of events (x, y, p, t < 2**23 us): the inverse of `decode_nmnist` for
    recordings without overflow markers (tests build recordings with it)."""
    out = np.zeros((len(events), 5), dtype=np.uint8)
    t = np.asarray(events["t"], dtype=np.int64)
    if len(t) and (t.min() < 0 or t.max() >= 2**23):
        raise ValueError("N-MNIST timestamps are 23-bit microseconds")
    out[:, 0], out[:, 1] = events["x"], events["y"]
    out[:, 2] = (np.asarray(events["p"], dtype=np.int64) << 7) | (t >> 16)
    out[:, 3], out[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    return out.tobytes()


def read_gesture_npy(path: Path) -> np.ndarray:
    """Events of one DVS Gesture recording in tonic's `.npy` layout (t converted ms -> us)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{path} is not a readable .npy array ({str(err)[:120]}); "
                           "re-extract the DVS Gesture archive") from None
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(f"{path} holds a {arr.dtype} array of shape {arr.shape}, expected "
                           "[N, 4] numbers (x, y, p, t in ms); not a DVS Gesture recording")
    events = np.empty(len(arr), dtype=EVENT)
    events["x"], events["y"] = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
    events["p"] = arr[:, 2] > 0
    events["t"] = np.round(arr[:, 3].astype(np.float64) * 1000).astype(np.int64)
    xy = arr[:, :2]
    if len(arr) and (xy.min() < 0 or xy.max() >= GESTURE_SENSOR):
        raise DatasetError(f"{path} has events outside the 128 x 128 sensor: not a DVS "
                           "Gesture recording")
    return events


# ---------------------------------------------------------------------------------------------
# framing

def frame_events(events: np.ndarray, sensor: int, framing: Framing) -> np.ndarray:
    """`[T, 2, S, S]` uint8 binary frames of one recording (the rules in the module docstring)."""
    steps, size = framing.frames, framing.size
    frames = np.zeros((steps, 2, size, size), dtype=np.uint8)
    n = len(events)
    if n == 0:
        return frames
    order = np.argsort(events["t"], kind="stable")
    ev = events[order]
    t = ev["t"]
    if framing.mode == "time":
        span = int(t[-1] - t[0]) + 1
        bins = ((t - t[0]) * steps) // span
    else:
        bins = (np.arange(n, dtype=np.int64) * steps) // n
    factor = max(1, sensor // size)
    side = math.ceil(sensor / factor)
    offset = (side - size) // 2  # > 0 crops, < 0 pads
    x = ev["x"] // factor - offset
    y = ev["y"] // factor - offset
    inside = (x >= 0) & (x < size) & (y >= 0) & (y < size)
    channel = 1 - ev["p"].astype(np.int64)  # ON (p = 1) -> channel 0, OFF -> 1
    frames[bins[inside], channel[inside], y[inside], x[inside]] = 1
    return frames


# ---------------------------------------------------------------------------------------------
# datasets

def _split_dir(root: Path, names: tuple[str, ...], split_name: str, layout: str, what: str
               ) -> Path:
    for name in names:
        candidate = root / name / split_name if name else root / split_name
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{what}: no {split_name}/ folder in {root}; data-dir must hold {layout}")


def _stack(samples: list[np.ndarray], labels: list[int], framing: Framing
           ) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty((len(samples), framing.frames, 2, framing.size, framing.size))
    for i, frames in enumerate(samples):
        x[i] = torch.from_numpy(frames)
    return x, torch.tensor(labels, dtype=torch.int64)


def load_nmnist(root: Path, split: str, framing: Framing) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x [N, T, 2, S, S] float32 {0, 1}, y [N] int64)` of one N-MNIST split."""
    base = _split_dir(root, ("NMNIST", ""), "Train" if split == "train" else "Test",
                      NMNIST_LAYOUT, "N-MNIST")
    samples, labels = [], []
    for digit in range(10):
        folder = base / str(digit)
        if not folder.is_dir():
            raise DatasetError(f"N-MNIST: {folder} is missing; data-dir must hold {NMNIST_LAYOUT}")
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".bin"):
                continue
            path = folder / name
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise DatasetError(f"cannot read {path}: {err.strerror}") from None
            samples.append(frame_events(decode_nmnist(raw, str(path)), NMNIST_SENSOR, framing))
            labels.append(digit)
    if not samples:
        raise DatasetError(f"N-MNIST: no .bin recordings under {base}; data-dir must hold "
                           f"{NMNIST_LAYOUT}")
    return _stack(samples, labels, framing)


def load_dvs_gesture(root: Path, split: str, framing: Framing
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x [N, T, 2, S, S] float32 {0, 1}, y [N] int64 0..10)` of one DVS Gesture split."""
    base = _split_dir(root, ("DVSGesture", ""),
                      "ibmGestureTrain" if split == "train" else "ibmGestureTest",
                      GESTURE_LAYOUT, "DVS Gesture")
    samples, labels = [], []
    for user in sorted(os.listdir(base)):
        folder = base / user
        if not folder.is_dir():
            continue
        if not user.startswith("user") or "_" not in user:
            raise DatasetError(f"DVS Gesture: unexpected folder {folder} (user<NN>_<lighting> "
                               f"expected); data-dir must hold {GESTURE_LAYOUT}")
        names = [n for n in os.listdir(folder) if n.endswith(".npy")]
        for name in sorted(names, key=lambda n: (len(n), n)):  # 2.npy before 10.npy
            stem = name[:-4]
            if not stem.isdigit() or int(stem) >= GESTURE_CLASSES:
                raise DatasetError(f"DVS Gesture: {folder / name} is not named <label>.npy with a "
                                   f"label 0..{GESTURE_CLASSES - 1}")
            events = read_gesture_npy(folder / name)
            samples.append(frame_events(events, GESTURE_SENSOR, framing))
            labels.append(int(stem))
    if not samples:
        raise DatasetError(f"DVS Gesture: no .npy recordings under {base}; data-dir must hold "
                           f"{GESTURE_LAYOUT}")
    return _stack(samples, labels, framing)
