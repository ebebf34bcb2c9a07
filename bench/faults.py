"""Fault campaign on real processes: what spikefed-server and spikefed-client survive.

Everything runs on this machine, on loopback, with TLS (deploy/certs/generate.sh) and node keys
(deploy/certs/node-keys.sh), as real `spikefed-server` / `spikefed-client` processes:

1. admin probes: while registered devices train, a stranger on another loopback address
   (127.0.0.2), holding nothing, asks the devices' address for Flower's Control API, Runtime API,
   /docs and /openapi.json;
2. an unregistered device (its key never in --auth-keys) tries to join;
3. a device lost for good: one of `--devices` has its whole process group SIGKILLed after round 1;
   the run must go on with the others (rounds completed, seconds the loss cost: the mean round
   after the loss minus the mean round before);
4. SIGKILL of `spikefed-server` alone in the middle of a round, then `spikefed-server --resume`
   with one device's key removed from --auth-keys (revoked): rounds lost, metrics lines
   duplicated, processes of the killed server still running 10 s later (orphans), and whether the
   revoked device took part again. These devices pin the app (`--app-hash`, the value the server
   prints), so the run also shows that a pinned device runs the app it was told to;
5. every device lost for good after round 1: the wait for devices is bounded by
   `node-wait-timeout` (20 s here); the run must end with one line and exit code 1, its
   checkpoints intact for `--resume`.

It prints each fault, what was expected and what happened. Slow (minutes: several real runs on
a tiny model); never a test.

    python bench/faults.py [--devices 3] [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.process import ProcessTree, alive, descendants, kill_all, start_time  # noqa: E402

TINY = ("dataset=digits model=mlp time-steps=2 local-epochs=1 chip=none fraction-evaluate=0.0 "
        "round-timeout=60.0 node-wait-timeout=120.0 metrics-port=0")
PROBES = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/list-nodes"),
          ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
          ("GET", "/docs"), ("GET", "/openapi.json")]
WAIT_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Fleet:
    """spikefed commands as process trees, each in its own session, logs in files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees: dict[str, ProcessTree] = {}

    def start(self, name: str, module: str, *args: str) -> ProcessTree:
        env = {**os.environ, "FLWR_HOME": str(self.root / f"home-{name}"), "OMP_NUM_THREADS": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.trees[name] = ProcessTree(proc, every_s=0.5)
        return self.trees[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, *, group: bool) -> list[int]:
        """SIGKILL a command (or its process group); the processes below it alive 10 s later."""
        tree = self.trees[name]
        tree.refresh()
        below = list({*descendants(tree.pid), *tree.seen})
        started = {pid: start_time(pid) for pid in below}
        (os.killpg if group else os.kill)(tree.pid, signal.SIGKILL)
        tree.proc.wait()
        deadline = time.monotonic() + 10.0
        survivors = below
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [p for p in below if alive(p) and start_time(p) == started[p]]
        kill_all(survivors, grace_s=5.0)
        return survivors

    def wait_for(self, what: str, done: Callable[[], bool]) -> float:
        start = time.monotonic()
        while not done():
            if time.monotonic() - start > WAIT_S:
                raise SystemExit(f"gave up waiting for {what}; logs in {self.root}")
            time.sleep(0.5)
        return time.monotonic() - start

    def stop_all(self) -> None:
        for tree in self.trees.values():
            tree.stop(grace_s=5.0)


def rounds_in(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def history(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe(port: int, ca: Path, method: str, path: str) -> str:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                       source_address=("127.0.0.2", 0),
                                       context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Content-Type": "application/protobuf"})
        return str(conn.getresponse().status)
    except OSError as err:
        return f"refused ({err.__class__.__name__})"
    finally:
        conn.close()


def report(fault: str, expected: str, seen: str, ok: bool) -> None:
    print(f"{'SURVIVED' if ok else 'FAILED  '}  {fault}\n          expected: {expected}\n"
          f"          seen:     {seen}", flush=True)


def campaign(root: Path, devices: int, rounds: int) -> bool:
    scripts_env = {**os.environ, "PYTHON": sys.executable}
    certs, keys, allowed = root / "tls", root / "keys", root / "allowed"
    subprocess.run([str(REPO / "deploy/certs/generate.sh"), str(certs)], check=True,
                   capture_output=True, env=scripts_env)
    subprocess.run([str(REPO / "deploy/certs/node-keys.sh"), str(keys), str(devices + 1)],
                   check=True, capture_output=True, env=scripts_env)
    allowed.mkdir()
    for i in range(1, devices + 1):  # node-(devices+1) is the stranger
        (allowed / f"node-{i}.pub").write_bytes((keys / f"node-{i}.pub").read_bytes())
    fleet = Fleet(root)
    results = []
    try:
        # -- run 1: probes, a stranger, a device lost for good --------------------------------
        port, out = free_port(), root / "run-lost-device"
        server_args = ["--address", f"127.0.0.1:{port}", "--tls-dir", str(certs),
                       "--auth-keys", str(allowed), "--rounds", str(rounds), "--min-clients",
                       str(devices), "--out", str(out), "--run-config", TINY]
        server = fleet.start("server1", "server.deploy", *server_args)
        for i in range(1, devices + 2):
            fleet.start(f"device{i}", "client.cli", "--server", f"127.0.0.1:{port}",
                        "--ca-cert", str(certs / "ca.crt"), "--auth-key", str(keys / f"node-{i}"),
                        "--partition-id", str(min(i, devices) - 1), "--num-partitions",
                        str(devices), "--connect-timeout", "120" if i <= devices else "30")
        fleet.wait_for("round 1", lambda: 1 in rounds_in(out) or server.proc.poll() is not None)
        answers = {f"{m} {p}": probe(port, certs / "ca.crt", m, p) for m, p in PROBES}
        admitted = {k: v for k, v in answers.items() if v.startswith("2")}
        results.append(not admitted)
        report("admin probes from 127.0.0.2 while devices train", "no 2xx",
               ", ".join(f"{k} -> {v}" for k, v in answers.items()), not admitted)
        lost = f"device{devices}"
        orphans = fleet.kill(lost, group=True)
        lost_at = rounds_in(out)[-1]
        fleet.wait_for("run 1 to end", lambda: server.proc.poll() is not None)
        done = history(out)
        before = [r["duration_s"] for r in done if r["round"] <= lost_at]
        after = [r["duration_s"] for r in done if r["round"] > lost_at]
        cost = (sum(after) / len(after) - sum(before) / len(before)) if after and before else 0
        ok = server.proc.returncode == 0 and [r["round"] for r in done] == list(
            range(1, rounds + 1)) and not orphans
        results.append(ok)
        report(f"device lost for good after round {lost_at} (process group SIGKILLed)",
               f"all {rounds} rounds, the rest without it; none of its processes left",
               f"server exit {server.proc.returncode}; rounds {[r['round'] for r in done]} "
               f"with clients {[r['clients'] for r in done]}; {cost:+.1f} s per round after the "
               f"loss; its processes alive 10 s later: {len(orphans)}", ok)
        stranger = fleet.trees[f"device{devices + 1}"]
        fleet.wait_for("the stranger to give up", lambda: stranger.proc.poll() is not None)
        log = fleet.log(f"device{devices + 1}")
        ok = stranger.proc.returncode != 0 and "SuperNode ID" not in log
        results.append(ok)
        report("unregistered device (key never in --auth-keys)", "refused, never activated",
               f"exit {stranger.proc.returncode}; "
               f"{'activated' if 'SuperNode ID' in log else 'never activated'}; "
               f"{(log.strip().splitlines() or [''])[-1][:120]}", ok)
        fleet.stop_all()

        # -- run 2: the server SIGKILLed mid-round, resumed with one key revoked --------------
        port, out = free_port(), root / "run-server-crash"

        def server_args(min_clients: int) -> list[str]:
            return ["--address", f"127.0.0.1:{port}", "--tls-dir", str(certs), "--auth-keys",
                    str(allowed), "--rounds", str(rounds), "--min-clients", str(min_clients),
                    "--out", str(out), "--run-config", TINY]

        fleet = Fleet(root)
        server = fleet.start("server2", "server.deploy", *server_args(devices))
        # the devices pin the app the server announces (it submits before any device is needed)
        fleet.wait_for("the app hash", lambda: "--app-hash " in fleet.log("server2")
                       or server.proc.poll() is not None)
        found = re.search(r"--app-hash ([0-9a-f]{64})", fleet.log("server2"))
        pin = ["--app-hash", found[1]] if found else []
        for i in range(1, devices + 1):
            fleet.start(f"node{i}", "client.cli", "--server", f"127.0.0.1:{port}",
                        "--ca-cert", str(certs / "ca.crt"), "--auth-key", str(keys / f"node-{i}"),
                        "--partition-id", str(i - 1), "--num-partitions", str(devices),
                        "--connect-timeout", "180", *pin)
        fleet.wait_for("round 1", lambda: 1 in rounds_in(out) or server.proc.poll() is not None)
        time.sleep(1.0)  # into round 2
        orphans = fleet.kill("server2", group=False)
        kept = rounds_in(out)
        (allowed / f"node-{devices}.pub").unlink()  # revoke the last device
        started = time.monotonic()
        resumed = fleet.start("server2-resumed", "server.deploy", *server_args(devices - 1),
                              "--resume")
        fleet.wait_for("the resumed run to end", lambda: resumed.proc.poll() is not None)
        seconds = time.monotonic() - started
        done = rounds_in(out)
        duplicated = len(done) - len(set(done))
        records = history(out)
        revoked_joined = any(r["clients"] >= devices for r in records if r["round"] > kept[-1])
        # the app is this checkout: edited between the two starts, its hash changes and the
        # pinned devices must refuse it (a shared working tree does that; a release does not)
        hashes = [re.search(r"--app-hash ([0-9a-f]{64})", fleet.log(name))
                  for name in ("server2", "server2-resumed")]
        app_changed = bool(pin) and all(hashes) and hashes[0][1] != hashes[1][1]
        resumed_clients = [r["clients"] for r in records if r["round"] > kept[-1]]
        if app_changed:
            trained = all(c == 0 for c in resumed_clients) and "refused the run" in fleet.log(
                "node1")
        else:
            trained = all(c == devices - 1 for c in resumed_clients)
        ok = (resumed.proc.returncode == 0 and done == list(range(1, rounds + 1))
              and not duplicated and not orphans and not revoked_joined and trained)
        results.append(ok)
        report("spikefed-server SIGKILLed in round 2, then --resume with one key revoked",
               "no orphans; every round once; the revoked device never trains again",
               f"orphans {len(orphans)}; rounds on disk at the kill {kept} (round "
               f"{kept[-1] + 1}'s work lost, redone), after resume {done} (duplicated lines "
               f"{duplicated}); resume "
               f"exit {resumed.proc.returncode} in {seconds:.0f} s; clients per round "
               f"{[r['clients'] for r in records]}; revoked device trained again: "
               f"{revoked_joined}; server said 'revoked node': "
               f"{'revoked node' in fleet.log('server2-resumed')}; devices pinned the app: "
               f"{bool(pin)}" + ("; the app changed between the starts (checkout edited): the "
                                 "pinned devices refused it" if app_changed else ""), ok)
        fleet.stop_all()

        # -- run 3: every device lost for good: the wait is bounded ---------------------------
        port, out = free_port(), root / "run-all-devices-lost"
        fleet = Fleet(root)
        server = fleet.start("server3", "server.deploy", "--address", f"127.0.0.1:{port}",
                             "--insecure", "--rounds", str(rounds), "--min-clients", "2",
                             "--out", str(out), "--run-config",
                             TINY.replace("node-wait-timeout=120.0", "node-wait-timeout=20.0"))
        for i in (1, 2):
            fleet.start(f"lab{i}", "client.cli", "--server", f"127.0.0.1:{port}", "--insecure",
                        "--partition-id", str(i - 1), "--num-partitions", "2",
                        "--connect-timeout", "120")
        fleet.wait_for("round 1", lambda: 1 in rounds_in(out) or server.proc.poll() is not None)
        orphans = fleet.kill("lab1", group=True) + fleet.kill("lab2", group=True)
        lost_at = time.monotonic()
        fleet.wait_for("the server to give up", lambda: server.proc.poll() is not None)
        seconds = time.monotonic() - lost_at
        errors = [ln for ln in fleet.log("server3").splitlines() if ln.startswith("error:")]
        from shared.rundir import RunDir

        try:
            intact = RunDir(out).check_start(resume=True)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            intact = f"none ({err})"
        ok = (server.proc.returncode == 1 and len(errors) == 1 and "--resume" in errors[0]
              and intact == rounds_in(out)[-1] and not orphans)
        results.append(ok)
        report("every device lost for good after round 1 (node-wait-timeout=20)",
               "the run ends: one line, exit 1, checkpoints intact for --resume",
               f"server exit {server.proc.returncode} {seconds:.0f} s after the loss; "
               f"{errors[0][:160] if errors else 'no error line'}; --resume would continue "
               f"after round {intact}", ok)
    finally:
        fleet.stop_all()
    print(f"\n{sum(results)} of {len(results)} faults survived; logs in {root}")
    return all(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="directory for the logs and runs (kept)")
    args = parser.parse_args()
    if args.devices < 3 or args.rounds < 3:
        parser.error("--devices and --rounds must be at least 3 (a loss needs rounds after it)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        ok = campaign(args.keep, args.devices, args.rounds)
    else:
        with tempfile.TemporaryDirectory(prefix="spikefed-faults-") as tmp:
            ok = campaign(Path(tmp), args.devices, args.rounds)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
