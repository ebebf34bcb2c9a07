"""The run directory: where a federated run keeps its files, and the typed round history.

    <run>/checkpoints/round-NNN.safetensors (+ .json)   the global model after round NNN
    <run>/checkpoints/snn-round-NNN.safetensors          train-mode qann: the converted SNN
    <run>/metrics.jsonl                                  one `RoundRecord` (JSON) per finished round
    <run>/summary.json                                   rounds, accuracy, history, config
    <run>/report.md, <run>/plots/                        the run's report (server.report)
    <run>/neurocore/                                     chip report of the final global model
    <run>/fleet.json                                     a fleet's per-device state (--fleet)
    <run>/evaluation/                                    spikefed-run's closing evaluation

Round numbers are zero-padded to at least three digits and always compared as numbers, so round
1000 comes after round 999. Every file is written so that a crash leaves either the old or the
new version: checkpoints and summary.json through a temporary file, fsync and rename;
metrics.jsonl lines are appended and fsynced (a round counts as done once its line is on disk).
A run holds `<run>/.lock` (an advisory `flock`, released by the kernel when the process dies,
however it dies) while it writes there, so a second run into the same directory is refused;
`unique_run_dir` makes default run names that never collide.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.checkpoint import atomic_write, load_checkpoint
from shared.errors import CheckpointError, RunError

_ROUND_FILE = re.compile(r"round-(\d{3,})\.safetensors")
log = logging.getLogger("spikefed")


@dataclass
class RoundRecord:
    """One finished round, as metrics.jsonl and summary.json's `history` hold it."""

    round: int
    accuracy: float  # global model on the test split, 0..1
    loss: float
    clients: int = 0  # updates aggregated
    failed: int = 0  # error replies (client exceptions, lost nodes)
    rejected: int = 0  # replies refused by validation
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    energy_j: float = 0.0  # the clients' chip-accounted training energy, summed
    cycles: int = 0
    dram_bytes: int = 0
    duration_s: float = 0.0
    train_loss: float | None = None
    train_accuracy: float | None = None
    client_accuracy: float | None = None
    spike_density: float | None = None
    # the devices' simulated round (shared.fleet); a run without a fleet, or an older run
    # directory, has sim_seconds / sim_energy_j None and no stragglers
    selected: int = 0  # devices (nodes) asked to train
    online: int | None = None  # devices online this round (fleet)
    stragglers: int = 0  # replies dropped: later than round-deadline-s
    out_of_energy: int = 0  # replies dropped: the device's budget or battery ran out
    sim_seconds: float | None = None  # the round's simulated time
    sim_energy_j: float | None = None  # joules the selected devices spent, chip + radio
    energy_by_class: dict[str, float] = field(default_factory=dict)  # device class -> joules

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """A record from a metrics.jsonl line; keys it does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class DirLock:
    """An exclusive `flock` on `path`, held until `release()` or the process's end.

    The file keeps the holder's pid (for the message a refused second run prints)."""

    _fd: int | None = None

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{path.parent} is in use by another {what} (pid {holder}); wait for "
                           "it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def unique_run_dir(parent: str | Path = "runs") -> Path:
    """A new, empty directory `parent/<date>-<time>` (`-2`, `-3`, ... when that name is taken):
    created here with `mkdir`, which fails for an existing name, so two runs started in the same
    second get different directories."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunError(f"{parent} holds 10,000 runs named {stamp}*; pass --out")


def round_of(path: Path) -> int | None:
    """The round number of a `round-NNN.safetensors` file name (None for any other name)."""
    match = _ROUND_FILE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def find_checkpoints(directory: str | Path) -> list[Path]:
    """The `round-NNN.safetensors` files in `directory`, ordered by round number."""
    found = [(round_of(p), p) for p in Path(directory).glob("round-*.safetensors")]
    return [p for r, p in sorted((r, p) for r, p in found if r is not None)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest round's checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = find_checkpoints(path / "checkpoints") or find_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} holds no round-NNN.safetensors checkpoint; pass a "
                                  "checkpoint file or a run directory")
        return found[-1]
    return path


@dataclass(frozen=True)
class RunDir:
    """The files of one run below `root`."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def lock(self) -> DirLock:
        """Hold this run directory (see `DirLock`): a RunError if another run holds it."""
        return DirLock(self.lock_file, "run")

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def neurocore_dir(self) -> Path:
        return self.root / "neurocore"

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.json"

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluation"

    def checkpoint(self, round_: int) -> Path:
        return self.checkpoints_dir / f"round-{round_:03d}.safetensors"

    def converted_checkpoint(self, round_: int) -> Path:
        return self.checkpoints_dir / f"snn-round-{round_:03d}.safetensors"

    def checkpoints(self) -> list[Path]:
        return find_checkpoints(self.checkpoints_dir)

    def last_good_checkpoint(self) -> tuple[Path, dict, dict] | None:
        """The newest checkpoint that loads and verifies, as (path, tensors, metadata); each
        one skipped is logged."""
        for path in reversed(self.checkpoints()):
            try:
                tensors, meta = load_checkpoint(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                continue
            if meta.get("round") != round_of(path):
                log.warning("skipping checkpoint: %s records round %r, not the round its name "
                            "says", path, meta.get("round"))
                continue
            return path, tensors, meta
        return None

    def check_start(self, resume: bool) -> int:
        """Refuse a new run where one exists and a resume where none does; returns the round
        the run continues after (0 for a new run)."""
        if not resume:
            if self.checkpoints():
                raise RunError(f"{self.root} already holds a run; pass --resume to continue it "
                               "or choose another --out")
            return 0
        found = self.last_good_checkpoint()
        if found is None:
            raise RunError(f"--resume: no valid checkpoint in {self.checkpoints_dir}; run "
                           "without --resume to start a new run there")
        round_ = found[2].get("round")
        if type(round_) is not int:  # load_checkpoint checks it; spelt out for the reader
            raise RunError(f"--resume: {found[0]} records no round number")
        return round_

    # -- the round history -------------------------------------------------------------------
    def read_history(self) -> list[RoundRecord]:
        """The rounds in metrics.jsonl; a line cut short by a crash ends the readable history."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                data = json.loads(line)
                records.append(RoundRecord.from_json(data))
            except (json.JSONDecodeError, TypeError, AttributeError):
                break
        return records

    def write_history(self, records: list[RoundRecord]) -> None:
        """Replace metrics.jsonl by `records` (atomically)."""
        text = "".join(json.dumps(r.to_json()) + "\n" for r in records)
        atomic_write(self.metrics_file, text.encode())

    def append_round(self, record: RoundRecord) -> None:
        """Append one round to metrics.jsonl and fsync it: the round is on disk on return."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        atomic_write(self.summary_file, (json.dumps(summary, indent=2) + "\n").encode())
        return self.summary_file

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text())
