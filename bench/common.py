"""Timing helpers shared by the benchmarks: alternate implementations in rounds, watch the load."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def busy_cpu_seconds() -> float | None:
    """CPU seconds all cores together have spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def run_for(step: Callable[[int], object], seconds: float) -> tuple[int, float, float | None]:
    """Call `step(i)` for i = 0, 1, ... until `seconds` have passed.

    Returns (calls, elapsed seconds, CPU cores other processes kept busy meanwhile, or None).
    """
    n = 0
    busy0, own0 = busy_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    while True:
        step(n)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    busy1, own1 = busy_cpu_seconds(), time.process_time()
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed
    return n, elapsed, others


def alternate(
    steps: dict[str, Callable[[int], object]], rounds: int, seconds: float, warmup: float
) -> tuple[dict[str, list[float]], list[float]]:
    """Calls/s of every step function in every round (rotating who goes first, after a warm-up),
    and the other processes' CPU load (cores) measured during each timed run."""
    names = list(steps)
    for name in names:  # warm-up: allocator, oneDNN primitive caches, lazy imports
        run_for(steps[name], warmup)
    rates: dict[str, list[float]] = {name: [] for name in names}
    others: list[float] = []
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            n, elapsed, load = run_for(lambda i, f=steps[name], r=r: f(r + i), seconds)
            rates[name].append(n / elapsed)
            if load is not None:
                others.append(load)
    return rates, others


def print_table(
    title: str, header: list[str], rows: list[list[str]], width: int | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    if width is None and not sys.stdout.isatty():
        width = 140  # a log file: rich would assume 80 columns and wrap every row
    Console(width=width).print(table)


def warn_if_busy(others: list[float], threshold: float = 0.2) -> None:
    """Warn when other processes kept more than `threshold` cores busy during the timed runs."""
    if others and statistics.median(others) > threshold:
        print(f"warning: other processes kept {statistics.median(others):.2f} cores busy; "
              "rerun on a quiet machine")


def spikefed_run(out: str, *args: str, reuse: bool = False) -> dict:
    """Run `spikefed-run --out OUT ARGS...` in a fresh process (its own Ray session) and return
    its summary.json; a failed run raises with the command's last output lines. With `reuse`, a
    finished run already in OUT (same arguments, recorded in OUT/bench-args.json) is not redone."""
    record = Path(out) / "bench-args.json"
    if reuse and record.is_file() and json.loads(record.read_text()) == list(args):
        return json.loads((Path(out) / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # a stale or unfinished run of this bench
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "server.run", "--out", out, *args]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({result.returncode}):\n{tail}")
    record.write_text(json.dumps(list(args)))
    return json.loads((Path(out) / "summary.json").read_text())
