"""shared.data.recordings: N-MNIST `.bin` files and DVS Gesture `.npy` recordings built here, a
few events each, decoded and framed; frames checked against frames computed by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.data import DatasetError, Framing, dataset_info, load_dataset
from shared.data.recordings import EVENT, decode_nmnist, encode_nmnist, frame_events
from shared.snn import build_model, model_layout


def events(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A structured event array from (x, y, p, t_us) rows."""
    out = np.empty(len(rows), dtype=EVENT)
    for i, (x, y, p, t) in enumerate(rows):
        out[i] = (x, y, p, t)
    return out


def class_events(label: int, sample: int, sensor: int, n: int = 40) -> np.ndarray:
    """A recording whose ON events fall on a column set by the label and OFF events on a row."""
    rng = np.random.default_rng(1000 * label + sample)
    step = sensor // 11
    rows = []
    for i in range(n):
        t = int(i * 2000 + rng.integers(0, 1000))
        near, anywhere = label * step + int(rng.integers(0, 2)), int(rng.integers(0, sensor))
        rows.append((near, anywhere, 1, t) if i % 2 else (anywhere, near, 0, t))
    return events(rows)


def make_nmnist(root, per_class: dict[str, int]) -> None:
    """`root/NMNIST/{Train,Test}/<digit>/<n>.bin`, `per_class[split]` recordings a digit."""
    for split, count in per_class.items():
        for digit in range(10):
            folder = root / "NMNIST" / split / str(digit)
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:05d}.bin").write_bytes(encode_nmnist(class_events(digit, i, 34)))


def make_gesture(root, per_class: dict[str, int]) -> None:
    """`root/DVSGesture/ibmGesture{Train,Test}/user<NN>_led/<label>.npy` (x, y, p, t in ms)."""
    for split, count in per_class.items():
        for user in range(count):
            folder = root / "DVSGesture" / f"ibmGesture{split}" / f"user{user + 1:02d}_led"
            folder.mkdir(parents=True)
            for label in range(11):
                ev = class_events(label, user, 128)
                arr = np.stack([ev["x"], ev["y"], ev["p"], ev["t"] // 1000], 1).astype(np.int64)
                np.save(folder / f"{label}.npy", arr)


# --- decoding -------------------------------------------------------------------------------


def test_nmnist_bytes_decode_by_hand_with_polarity_and_overflow():
    raw = bytes([3, 5, 0x80 | 0x01, 0x23, 0x45,  # x 3, y 5, ON, t 0x012345 us
                 33, 0, 0x00, 0x00, 0x07,        # x 33, y 0, OFF, t 7
                 0, 240, 0, 0, 0,                # overflow marker: later events + 2**13 us
                 1, 2, 0x80, 0x00, 0x01])        # x 1, y 2, ON, t 1 + 8192
    ev = decode_nmnist(raw)
    assert ev["x"].tolist() == [3, 33, 1] and ev["y"].tolist() == [5, 0, 2]
    assert ev["p"].tolist() == [1, 0, 1]
    assert ev["t"].tolist() == [0x012345, 7, 8193]


def test_our_nmnist_decoder_agrees_with_tonics(tmp_path):
    import tonic.io

    path = tmp_path / "00001.bin"
    path.write_bytes(encode_nmnist(class_events(4, 0, 34, n=50)))
    ours = decode_nmnist(path.read_bytes())
    theirs = tonic.io.read_mnist_file(str(path), dtype=np.dtype(
        [("x", int), ("y", int), ("t", int), ("p", int)]))
    for key in "xytp":
        assert ours[key].tolist() == theirs[key].tolist()


@pytest.mark.parametrize("raw, needle", [
    (b"\x00" * 7, "not a multiple of 5"),
    (bytes([34, 0, 0, 0, 0]), "outside the 34 x 34"),
])
def test_malformed_nmnist_bytes_are_one_line_errors(raw, needle):
    with pytest.raises(DatasetError, match=needle) as err:
        decode_nmnist(raw, "x.bin")
    assert "\n" not in str(err.value)


# --- framing --------------------------------------------------------------------------------


def test_time_bins_by_hand():
    # span 0..999 us, T = 4: bins [0, 250), [250, 500), [500, 750), [750, 1000)
    ev = events([(1, 1, 1, 0), (2, 1, 0, 249), (2, 1, 0, 250), (1, 2, 1, 999), (1, 1, 1, 100)])
    frames = frame_events(ev, 34, Framing(frames=4, mode="time", size=32))
    expected = np.zeros((4, 2, 32, 32), np.uint8)
    # crop 34 -> 32 drops one pixel each side: sensor (x, y) lands on frame (x - 1, y - 1)
    expected[0, 0, 0, 0] = 1      # (1, 1) ON at 0 and 100 (one pixel, binary)
    expected[0, 1, 0, 1] = 1      # (2, 1) OFF at 249
    expected[1, 1, 0, 1] = 1      # (2, 1) OFF at 250
    expected[3, 0, 1, 0] = 1      # (1, 2) ON at 999
    assert np.array_equal(frames, expected)


def test_event_count_bins_by_hand():
    ev = events([(5, 5, 1, t) for t in (0, 1, 2, 3, 4, 5)] + [(6, 5, 0, 1_000_000)])
    frames = frame_events(ev, 34, Framing(frames=2, mode="count", size=32))
    # 7 events, T = 2: events 0..3 (i * 2 // 7 == 0) in bin 0, events 4..6 in bin 1
    assert frames[0, 0, 4, 4] == 1 and frames[1, 0, 4, 4] == 1
    assert frames[1, 1, 4, 5] == 1 and frames[0, 1].sum() == 0
    assert frames.sum() == 3
    time_frames = frame_events(ev, 34, Framing(frames=2, mode="time", size=32))
    assert time_frames[0, 0, 4, 4] == 1 and time_frames[1, 0].sum() == 0  # all early events


def test_downsampling_and_padding_by_hand():
    ev = events([(0, 0, 1, 0), (3, 3, 1, 1), (4, 0, 0, 2), (127, 127, 0, 3)])
    frames = frame_events(ev, 128, Framing(frames=1, size=32))  # 128 / 32: 4 x 4 blocks
    assert frames[0, 0, 0, 0] == 1 and frames[0, 1, 0, 1] == 1 and frames[0, 1, 31, 31] == 1
    assert frames.sum() == 3
    padded = frame_events(events([(0, 0, 1, 0), (33, 33, 0, 1)]), 34, Framing(frames=1, size=36))
    assert padded[0, 0, 1, 1] == 1 and padded[0, 1, 34, 34] == 1  # one pixel of zeros around


# --- datasets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nmnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nmnist")
    make_nmnist(root, {"Train": 6, "Test": 2})
    return root


@pytest.fixture(scope="module")
def gesture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gesture")
    make_gesture(root, {"Train": 6, "Test": 2})
    return root


def test_nmnist_keeps_the_published_split_and_frames_each_recording(nmnist_dir):
    train = load_dataset("nmnist", "train", data_dir=nmnist_dir)
    x, y = train.tensors
    assert x.shape == (60, 8, 2, 32, 32) and x.dtype == torch.float32
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert y.tolist() == [d for d in range(10) for _ in range(6)]
    assert len(load_dataset("nmnist", "test", data_dir=nmnist_dir).tensors[1]) == 20
    raw = (nmnist_dir / "NMNIST" / "Train" / "3" / "00001.bin").read_bytes()
    expected = frame_events(decode_nmnist(raw), 34, Framing())
    assert torch.equal(x[3 * 6 + 1], torch.from_numpy(expected).float())
    small = load_dataset("nmnist", "test", data_dir=nmnist_dir,
                         framing=Framing(frames=3, mode="count", size=16)).tensors[0]
    assert small.shape == (20, 3, 2, 16, 16)
    assert dataset_info("nmnist", Framing(frames=3, size=16)).input_size == 16


def test_dvs_gesture_reads_tonics_layout(gesture_dir):
    x, y = load_dataset("dvs-gesture", "train", data_dir=gesture_dir).tensors
    assert x.shape == (66, 8, 2, 32, 32) and sorted(set(y.tolist())) == list(range(11))
    assert dataset_info("dvs-gesture").num_classes == 11
    arr = np.load(gesture_dir / "DVSGesture" / "ibmGestureTest" / "user02_led" / "7.npy")
    ev = events([(int(a), int(b), int(p), int(t) * 1000) for a, b, p, t in arr])
    test_x, test_y = load_dataset("dvs-gesture", "test", data_dir=gesture_dir).tensors
    index = 11 + 7  # user01 then user02, labels in order
    assert test_y[index] == 7
    assert torch.equal(test_x[index], torch.from_numpy(frame_events(ev, 128, Framing())).float())


def test_missing_or_malformed_directories_name_the_layout(tmp_path, nmnist_dir):
    for name, needle in (("nmnist", "NMNIST/Train/<digit>"), ("dvs-gesture", "ibmGestureTrain")):
        with pytest.raises(DatasetError, match=needle):
            load_dataset(name, "train", data_dir=tmp_path)
        with pytest.raises(DatasetError, match="pass data-dir"):
            load_dataset(name, "train")
    broken = tmp_path / "broken"
    make_nmnist(broken, {"Train": 1})
    (broken / "NMNIST" / "Train" / "5" / "00000.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DatasetError, match="not a multiple of 5") as err:
        load_dataset("nmnist", "train", data_dir=broken)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad" / "DVSGesture" / "ibmGestureTrain" / "user01_led"
    bad.mkdir(parents=True)
    np.save(bad / "3.npy", np.zeros((4, 3)))
    with pytest.raises(DatasetError, match=r"expected \[N, 4\]"):
        load_dataset("dvs-gesture", "train", data_dir=tmp_path / "bad")


# --- training, attacks, a federation --------------------------------------------------------


@pytest.mark.parametrize("name", ["nmnist", "dvs-gesture"])
def test_sda_attacks_a_model_trained_on_the_recordings(name, nmnist_dir, gesture_dir):
    from shared.attack import sda

    root = nmnist_dir if name == "nmnist" else gesture_dir
    x, y = load_dataset(name, "train", data_dir=root).tensors
    info = dataset_info(name)
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=2, num_classes=info.num_classes,
                        input_size=info.input_size, time_steps=8, surrogate="rectangle")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(model_layout(x)), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        correct = (model(model_layout(x)).argmax(1) == y).nonzero().flatten()
    assert len(correct) > len(y) // 2  # the model learned the recordings
    i = int(correct[0])
    sample = x[i].unsqueeze(1)  # [T, 1, 2, S, S]
    result = sda(model, sample, y[i : i + 1], max_iterations=50)
    assert result.x_adv.shape == sample.shape
    assert set(result.x_adv.unique().tolist()) <= {0.0, 1.0}
    assert result.success and 0 < result.l0 == int((result.x_adv != sample).sum())
    with torch.no_grad():
        assert model(result.x_adv).argmax(1) != y[i]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nmnist", "dvs-gesture"])
def test_a_short_federation_runs_on_the_recordings(name, nmnist_dir, gesture_dir, tmp_path):
    root = nmnist_dir if name == "nmnist" else gesture_dir
    out = tmp_path / "run"
    config = (f"dataset={name} data-dir={root} model=mlp partitioning=iid local-epochs=1 "
              "chip=none weight-bits=32")
    result = subprocess.run(
        [sys.executable, "-m", "server.run", "--clients", "2", "--rounds", "1", "--out",
         str(out), "--no-evaluate", "--metrics-port", "0", "--run-config", config],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and 0.0 <= summary["final_accuracy"] <= 1.0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_recordings_partition_like_every_dataset(nmnist_dir, scheme):
    from shared.data import partition_indices

    y = load_dataset("nmnist", "train", data_dir=nmnist_dir).tensors[1]
    parts = [partition_indices(y, 3, i, scheme=scheme, alpha=0.5, seed=0) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    again = partition_indices(y, 3, 1, scheme=scheme, alpha=0.5, seed=0)
    assert np.array_equal(again, parts[1])


def test_run_config_keys_set_the_framing_and_the_model_shape():
    from shared.config import ConfigError, RunConfig

    config = RunConfig.parse({"dataset": "dvs-gesture", "event-frames": 5, "event-size": 16,
                              "event-framing": "count"})
    assert config.framing() == Framing(frames=5, mode="count", size=16)
    spec = config.model_spec()
    assert (spec["in_channels"], spec["num_classes"], spec["input_size"], spec["time_steps"]) \
        == (2, 11, 16, 5)
    assert RunConfig.parse({}).framing() == Framing()  # the defaults: T = 8, time bins, 32
    with pytest.raises(ConfigError, match="event-size=30"):
        RunConfig.parse({"event-size": 30})
