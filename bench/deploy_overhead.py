"""Deployment vs simulation: seconds per round and bytes per round on the wire.

Runs the same federation twice on this machine: once for real (`spikefed-server` with TLS and
N `spikefed-client` processes, each a Flower SuperNode that starts a fresh ClientApp process per
message) and once with `spikefed-run` (Flower's simulation engine, ClientApps in Ray actors).
It prints the median seconds per round of each (the `duration_s` of every round in
metrics.jsonl: from sending the global model to the evaluated, checkpointed result) and their
ratio, and for the deployment the bytes per round three ways: the model payload the strategy
counted (`bytes_up + bytes_down`), the SuperLink's own Fleet API count (`flwr ls`), and the TLS
bytes that really crossed the sockets between the clients and the SuperLink (a byte-counting
TCP relay sits between them; it includes connection setup, heartbeats and the one FAB download
per node and run, spread over the rounds).

    python bench/deploy_overhead.py [--clients 2] [--rounds 3] [--run-config "local-epochs=1"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import busy_cpu_seconds, print_table  # noqa: E402
from shared.process import ProcessTree  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ByteCounter:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that counts the bytes in each direction."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.up = 0  # client -> server
        self.down = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self.ready.set()
        self.server = server  # kept open for the life of the process
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, "up"),
                             self._pipe(up_reader, writer, "down"))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
        try:
            while data := await src.read(65536):
                if way == "up":
                    self.up += len(data)
                else:
                    self.down += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_HOME": str(home), "COLUMNS": "200",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "FLWR_TELEMETRY_ENABLED": "0"}


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deployed(work: Path, clients: int, rounds: int, run_config: str) -> dict:
    certs = work / "certs"
    subprocess.run([str(ROOT / "deploy/certs/generate.sh"), str(certs)], check=True,
                   capture_output=True)
    port, out = free_port(), work / "deployed"
    relay = ByteCounter(port)
    log = (work / "server.log").open("w")
    server = ProcessTree(subprocess.Popen(
        [sys.executable, "-m", "server.deploy", "--address", f"127.0.0.1:{port}", "--tls-dir",
         str(certs), "--rounds", str(rounds), "--min-clients", str(clients), "--out", str(out),
         "--run-config", run_config], cwd=ROOT, env=env(work / "home-server"), stdout=log,
        stderr=subprocess.STDOUT))
    nodes = [ProcessTree(subprocess.Popen(
        [sys.executable, "-m", "client.cli", "--server", f"127.0.0.1:{relay.port}", "--ca-cert",
         str(certs / "ca.crt"), "--partition-id", str(i), "--num-partitions", str(clients)],
        cwd=ROOT, env=env(work / f"home-{i}"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)) for i in range(clients)]
    started = time.perf_counter()
    try:
        code = server.wait()
    finally:
        for tree in [server, *nodes]:
            tree.stop(grace_s=5.0)
    if code != 0:
        raise SystemExit(f"spikefed-server failed ({code}); see {work / 'server.log'}")
    record = json.loads((out / "deployment.json").read_text())
    return {"history": history(out), "wall_s": time.perf_counter() - started,
            "fleet_bytes": record["network-traffic"]["total-bytes"],
            "wire_bytes": relay.up + relay.down}


def simulated(work: Path, clients: int, rounds: int, run_config: str) -> dict:
    out = work / "simulated"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.run", "--clients", str(clients), "--rounds",
                    str(rounds), "--out", str(out), "--run-config", run_config], cwd=ROOT,
                   env=env(work / "home-sim"), check=True, capture_output=True)
    return {"history": history(out), "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-config", default="local-epochs=1 fraction-evaluate=0.0",
                        help="overrides for both runs (default: the default model, one epoch)")
    args = parser.parse_args(argv)
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spikefed-bench-") as tmp:
        work = Path(tmp)
        dep = deployed(work, args.clients, args.rounds, args.run_config)
        sim = simulated(work, args.clients, args.rounds, args.run_config)
    busy1, t1 = busy_cpu_seconds(), time.perf_counter()

    def per_round(run: dict) -> float:
        return statistics.median(e["duration_s"] for e in run["history"])

    payload = statistics.median(e["bytes_up"] + e["bytes_down"] for e in dep["history"])
    rounds = len(dep["history"])
    rows = [
        ["deployment (TLS)", f"{per_round(dep):.1f}",
         f"{dep['wall_s']:.0f}", f"{payload / 1e6:.3f}", f"{dep['fleet_bytes'] / rounds / 1e6:.3f}",
         f"{dep['wire_bytes'] / rounds / 1e6:.3f}"],
        ["spikefed-run (Ray)", f"{per_round(sim):.1f}", f"{sim['wall_s']:.0f}",
         "-", "-", "-"],
    ]
    print_table(
        f"{args.clients} clients, {args.rounds} rounds, --run-config \"{args.run_config}\"",
        ["mode", "s/round (median)", "wall s", "payload MB/round", "Fleet API MB/round",
         "TLS wire MB/round"], rows)
    print(f"deployment / simulation seconds per round: {per_round(dep) / per_round(sim):.2f}x")
    print(f"TLS wire bytes / model payload bytes: {dep['wire_bytes'] / rounds / payload:.2f}x")
    if busy0 is not None and busy1 is not None:
        print(f"all cores busy on average {(busy1 - busy0) / (t1 - t0):.2f} of {os.cpu_count()} "
              "during the runs (this benchmark's own processes included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
