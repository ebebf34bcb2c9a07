"""Launchers own their processes: everything a launcher starts ends with it, however it ends.

Flower's SuperLink and SuperNode start `flower-superexec` in a new session, which starts
`flwr-serverapp` / `flwr-clientapp` processes; a signal to the parent's process group does not
reach them, and they outlive a parent that dies (reparented to init). A launcher therefore starts
each Flower command under a *guardian* (`start_guarded`, this module run as a program): a small
stdlib-only Python process in its own session that

- asks the kernel for SIGTERM when the launcher dies (`PR_SET_PDEATHSIG`; SIGKILL of the
  launcher included, and a kill of the launcher's whole process group, which the guardian is
  not in),
- is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so every orphan below it, new sessions
  included, is reparented to it instead of init and stays findable in /proc,
- on that signal, on SIGTERM/SIGINT/SIGHUP, or when its command exits, ends every process below
  it (SIGTERM, SIGKILL after a grace period) and exits with the command's exit code.

`ProcessTree` is the launcher's handle: it also remembers the descendants it has seen and
`stop()` ends the guardian, then every one of them still alive. Linux only for the guardian's
guarantees (elsewhere the command runs without one and only `stop()` applies).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GUARDIAN_GRACE_S = 3.0  # after the launcher's death: short, so that the port is free at once


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


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:  # runs in the forked child, before exec: async-signal-safe
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_guarded(cmd: list[str], **popen: Any) -> subprocess.Popen:
    """Start `cmd` under a guardian (see the module's docstring); `popen` are Popen's keyword
    arguments (stdout, env, cwd, ...). Start it from the main thread: the kernel's parent-death
    signal follows the thread that forked."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(cmd, **popen)
    guardian = [sys.executable, "-m", "shared.process", str(os.getpid()), "--", *cmd]
    env = dict(popen.pop("env", None) or os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # `shared` must import in the guardian
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(guardian, start_new_session=True, env=env, **popen)


def _end_everything_below(grace_s: float) -> None:
    """SIGTERM, then SIGKILL, every descendant, until none is left (they may fork meanwhile)."""
    for _ in range(5):
        pids = descendants(os.getpid())
        if not pids:
            return
        kill_all(pids, grace_s)
        _reap()


def _reap(child: subprocess.Popen | None = None) -> None:
    """Collect exited processes below us (orphans reparent to a subreaper and must be reaped)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if child is not None and pid == child.pid and child.returncode is None:
            child.returncode = os.waitstatus_to_exitcode(status)


def guard(launcher: int, cmd: list[str]) -> int:
    """The guardian's body: run `cmd` until it exits or we are told to stop (or the launcher
    dies), then end everything below us. Returns the command's exit code (128 + signal when a
    signal ended it)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before we could ask to be told
        return 128 + signal.SIGTERM
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    try:
        child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    except OSError as err:
        print(f"error: cannot start {cmd[0]}: {err.strerror}", file=sys.stderr)
        return 127
    while not stopping and child.returncode is None:
        _reap(child)
        time.sleep(0.1)
    grace = GUARDIAN_GRACE_S if os.getppid() != launcher else 10.0
    _end_everything_below(grace)
    _reap(child)
    code = child.returncode
    if code is None:
        return 128 + (stopping[0] if stopping else signal.SIGTERM)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python -m shared.process LAUNCHER_PID -- COMMAND [ARG...]")
    sys.exit(guard(int(sys.argv[1]), sys.argv[3:]))
