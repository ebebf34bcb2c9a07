"""shared.rundir: rounds ordered as numbers past 999, the run-directory lock, unique run names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoint import save_checkpoint
from shared.errors import RunError
from shared.rundir import RoundRecord, RunDir, find_checkpoints, resolve_checkpoint, unique_run_dir


def _checkpoint(run: RunDir, round_: int) -> Path:
    return save_checkpoint(run.checkpoint(round_), {"w": torch.full((2,), float(round_))},
                           {"round": round_})


def test_rounds_past_999_are_ordered_as_numbers_everywhere(tmp_path: Path):
    run = RunDir(tmp_path)
    for r in (2, 999, 1000, 1001):
        _checkpoint(run, r)
    assert [p.name for p in run.checkpoints()] == [
        "round-002.safetensors", "round-999.safetensors", "round-1000.safetensors",
        "round-1001.safetensors"]
    assert resolve_checkpoint(tmp_path).name == "round-1001.safetensors"
    assert run.check_start(resume=True) == 1001
    path, _, meta = run.last_good_checkpoint()
    assert meta["round"] == 1001 and path == run.checkpoint(1001)
    assert find_checkpoints(tmp_path / "nowhere") == []


def test_a_checkpoint_whose_recorded_round_differs_from_its_name_is_skipped(tmp_path: Path, caplog):
    run = RunDir(tmp_path)
    _checkpoint(run, 1)
    save_checkpoint(run.checkpoint(2), {"w": torch.zeros(2)}, {"round": 7})  # renamed file
    with caplog.at_level("WARNING"):
        assert run.check_start(resume=True) == 1
    assert "records round 7" in caplog.text


def test_metrics_lines_are_on_disk_and_a_torn_last_line_ends_the_history(tmp_path: Path):
    run = RunDir(tmp_path)
    for r in (1, 2):
        run.append_round(RoundRecord(round=r, accuracy=0.5, loss=1.0))
    with run.metrics_file.open("a") as f:
        f.write('{"round": 3, "accur')  # a crash in the middle of a write
    assert [r.round for r in run.read_history()] == [1, 2]


def test_a_second_run_into_a_locked_directory_is_refused_with_one_line(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunError) as info:
            run.lock()
        message = str(info.value)
        assert "in use by another run" in message and "--out" in message and "\n" not in message
    run.lock().release()  # free again once released


def test_the_lock_goes_with_the_process_that_held_it(tmp_path: Path):
    """A holder killed by SIGKILL leaves no stale lock: the kernel drops a dead process's flock."""
    code = ("import sys, time; from shared.rundir import RunDir; "
            f"lock = RunDir({str(tmp_path)!r}).lock(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            RunDir(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path).lock().release()


def test_unique_run_dirs_never_collide(tmp_path: Path):
    made = {unique_run_dir(tmp_path) for _ in range(5)}  # well within one second
    assert len(made) == 5 and all(p.is_dir() and not any(p.iterdir()) for p in made)
