"""Stopping a process together with everything it started.

Flower's SuperLink and SuperNode start `flower-superexec` in a new session, which starts
`flwr-serverapp` / `flwr-clientapp` processes; a signal to the parent's process group does not
reach them, they outlive a parent that dies (reparented to init, so no longer its descendants)
and notice the loss only after a while. `ProcessTree` therefore remembers the descendants it
has seen (from /proc, so on Linux; elsewhere only the process itself is tracked) while it runs,
and `stop()` ends the parent, then every one of them still alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Ids of every live process below `pid`, from /proc; [] where there is no /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _signalable(pid)
    return state != "Z"


def _signalable(pid: int) -> bool:
    if Path("/proc").is_dir():
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_all(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM each of `pids`, then SIGKILL those still running after `grace_s` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


class ProcessTree:
    """A child process plus the descendants seen while it ran."""

    def __init__(self, proc: subprocess.Popen, every_s: float = 1.0) -> None:
        self.proc = proc
        self.seen: dict[int, int | None] = {}  # pid -> start time
        self._watcher = threading.Thread(target=self._watch, args=(every_s,), daemon=True)
        self._watcher.start()

    def _watch(self, every_s: float) -> None:
        while self.proc.poll() is None:
            self.refresh()
            time.sleep(every_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def refresh(self) -> None:
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                self.seen.setdefault(pid, start_time(pid))

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the process still runs after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process (SIGKILL after `grace_s` s), then everything it started."""
        self.refresh()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_all([p for p, t in self.seen.items() if start_time(p) == t], grace_s)
