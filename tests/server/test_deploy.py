"""spikefed-server + spikefed-client for real: a Flower SuperLink and SuperNodes as separate
processes on 127.0.0.1 (random free ports), TLS from deploy/certs/generate.sh, node keys from
deploy/certs/node-keys.sh; every process tree is stopped by the test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import free_port

from shared.checkpoint import load_checkpoint
from shared.process import ProcessTree, alive, descendants, kill_all, start_time
from shared.rundir import find_checkpoints

REPO = Path(__file__).resolve().parents[2]
TINY = ("dataset=digits model=mlp time-steps=2 local-epochs=1 chip=none fraction-evaluate=0.0 "
        "round-timeout=120.0")
HANG_GUARD_S = 400.0  # a bound on waiting, so that a broken run fails instead of hanging


SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable}  # for keys.py where openssl/ssh are missing




def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}


class Fleet:
    """Starts spikefed commands as process trees with their output in log files; kills them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trees: dict[str, ProcessTree] = {}

    def start(self, name: str, module: str, *args: str) -> ProcessTree:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                                env=env_for(self.root / f"home-{name}"), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.trees[name] = ProcessTree(proc, every_s=0.5)
        return self.trees[name]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, *, group: bool) -> list[int]:
        """SIGKILL a command (`group`: its whole process group, as a lost device's power cut)
        and return the processes it had started that are still running 10 s later: the
        launcher's guardians must have ended every one of them."""
        tree = self.trees[name]
        tree.refresh()
        below = [pid for pid in {*descendants(tree.pid), *tree.seen}]
        started = {pid: start_time(pid) for pid in below}
        if group:
            os.killpg(tree.pid, signal.SIGKILL)
        else:
            os.kill(tree.pid, signal.SIGKILL)
        tree.proc.wait()
        deadline = time.monotonic() + 10.0
        survivors = below
        while survivors and time.monotonic() < deadline:
            time.sleep(0.2)
            survivors = [p for p in below if alive(p) and start_time(p) == started[p]]
        kill_all(survivors, grace_s=5.0)  # never leave them to the next test
        return survivors

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while not done():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.trees)
                pytest.fail(f"gave up waiting for {what}\n{logs}")
            time.sleep(0.5)

    def stop_all(self) -> None:
        for tree in self.trees.values():
            tree.stop(grace_s=5.0)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "tls"
    subprocess.run([str(REPO / "deploy/certs/generate.sh"), str(out)], check=True,
                   capture_output=True, env=SCRIPT_ENV)
    return out


ADMIN_PROBES = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/list-nodes"),
                ("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/control/start-run"),
                ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/control/list-runs")]


def probe(port: int, ca_cert: Path | None, method: str, path: str) -> int:
    """The HTTP status the devices' address answers to a stranger on another loopback source
    address (127.0.0.2), holding nothing (an empty protobuf body, no credentials)."""
    import http.client
    import ssl

    kwargs = {"source_address": ("127.0.0.2", 0), "timeout": 10}
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(
                cafile=str(ca_cert)), **kwargs) if ca_cert
            else http.client.HTTPConnection("127.0.0.1", port, **kwargs))
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def rounds_in(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def finished(tree: ProcessTree) -> Callable[[], bool]:
    return lambda: tree.proc.poll() is not None


@pytest.mark.slow
def test_tls_federation_with_node_auth_survives_a_lost_client_and_refuses_a_stranger(
    fleet: Fleet, certs: Path, tmp_path: Path
):
    keys, registered = tmp_path / "keys", tmp_path / "registered"
    subprocess.run([str(REPO / "deploy/certs/node-keys.sh"), str(keys), "5"], check=True,
                   capture_output=True, env=SCRIPT_ENV)
    registered.mkdir()
    for i in (1, 2, 3, 5):  # node-4 is never registered; node-5 pins another app
        (registered / f"node-{i}.pub").write_bytes((keys / f"node-{i}.pub").read_bytes())
    port, out = free_port(), tmp_path / "run"
    server = fleet.start(
        "server", "server.deploy", "--address", f"127.0.0.1:{port}", "--tls-dir", str(certs),
        "--auth-keys", str(registered), "--rounds", "3", "--min-clients", "4", "--out", str(out),
        "--run-config", TINY,
    )
    for i in (1, 2, 3, 4, 5):
        fleet.start(
            f"client{i}", "client.cli", "--server", f"127.0.0.1:{port}", "--ca-cert",
            str(certs / "ca.crt"), "--auth-key", str(keys / f"node-{i}"), "--partition-id",
            str(min(i, 3) - 1), "--num-partitions", "3" if i != 4 else "4",
            # registered nodes retry until the server has registered their keys
            "--connect-timeout", "120" if i != 4 else "20",
            *(["--app-hash", "0" * 64] if i == 5 else []),
        )
    fleet.wait_for("round 1", lambda: 1 in rounds_in(out) or server.proc.poll() is not None)
    # while registered devices train: nothing but the Fleet API and /health for a stranger
    answers = {f"{m} {p}": probe(port, certs / "ca.crt", m, p) for m, p in ADMIN_PROBES}
    assert not [k for k, code in answers.items() if 200 <= code < 300], answers
    assert probe(port, certs / "ca.crt", "GET", "/health") == 200
    assert "SuperNode ID" in fleet.log("client3")  # it had joined before it is lost
    assert fleet.kill("client3", group=True) == []  # lost for good: its SuperNode too
    fleet.wait_for("the server to finish", finished(server))

    assert server.proc.returncode == 0, fleet.log("server")[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    history = summary["history"]
    assert [e["round"] for e in history] == [1, 2, 3] == rounds_in(out)
    assert history[0]["clients"] == 3  # min-clients: what the first round waits for
    assert history[-1]["clients"] == 2  # later rounds go on without the device lost for good
    # node-5 pinned another app: it refused every run before unpacking the FAB, with one line
    pinned = fleet.log("client5")
    assert "refused the run: its app (FAB) sha256" in pinned and "0" * 64 in pinned
    assert "Successfully installed" not in pinned
    assert all(e["failed"] >= 1 for e in history)  # its error replies
    fab_hash = re.search(r"--app-hash ([0-9a-f]{64})", fleet.log("server"))[1]
    assert fab_hash == json.loads((out / "deployment.json").read_text())["fab-hash"]
    assert all(e["bytes_up"] > 0 for e in history)
    assert [p.name for p in find_checkpoints(out / "checkpoints")][-1] == "round-003.safetensors"
    deployment = json.loads((out / "deployment.json").read_text())
    assert deployment["status"] == "finished:completed"
    assert deployment["network-traffic"]["total-bytes"] > 0
    assert "final accuracy" in fleet.log("server")

    stranger = fleet.trees["client4"]
    fleet.wait_for("the unregistered client to give up", finished(stranger))
    assert stranger.proc.returncode != 0
    assert "refused this node" in fleet.log("client4")
    assert "SuperNode ID" not in fleet.log("client4")  # never activated
    assert "Traceback" not in fleet.log("client4")


@pytest.mark.slow
def test_server_killed_after_round_1_resumes_with_every_round_once_and_a_revoked_key_out(
    fleet: Fleet, certs: Path, tmp_path: Path
):
    keys, registered = tmp_path / "keys", tmp_path / "registered"
    subprocess.run([str(REPO / "deploy/certs/node-keys.sh"), str(keys), "3"], check=True,
                   capture_output=True, env=SCRIPT_ENV)
    registered.mkdir()
    for i in (1, 2, 3):
        (registered / f"node-{i}.pub").write_bytes((keys / f"node-{i}.pub").read_bytes())
    port, out = free_port(), tmp_path / "run"
    server_args = ["--address", f"127.0.0.1:{port}", "--tls-dir", str(certs), "--auth-keys",
                   str(registered), "--rounds", "2", "--min-clients", "3", "--out", str(out),
                   "--run-config", TINY + " node-wait-timeout=60.0"]
    server = fleet.start("server", "server.deploy", *server_args)
    for i in (1, 2, 3):
        fleet.start(f"client{i}", "client.cli", "--server", f"127.0.0.1:{port}", "--ca-cert",
                    str(certs / "ca.crt"), "--auth-key", str(keys / f"node-{i}"),
                    "--partition-id", str(i - 1), "--num-partitions", "3",
                    "--connect-timeout", "120")
    fleet.wait_for("round 1", lambda: 1 in rounds_in(out) or server.proc.poll() is not None)
    # SIGKILL of the launcher alone: its SuperLink, SuperExec, ServerApp and nginx end with it
    assert fleet.kill("server", group=False) == []
    assert rounds_in(out) == [1] and not (out / "summary.json").exists()  # killed mid-run

    refused = fleet.start("server-no-resume", "server.deploy", *server_args)
    fleet.wait_for("the plain restart to refuse", finished(refused))
    assert refused.proc.returncode == 2 and "--resume" in fleet.log("server-no-resume")
    # node-3's key leaves --auth-keys: the resumed server revokes it; the port is free at once
    (registered / "node-3.pub").unlink()
    min_clients = server_args.index("--min-clients") + 1
    server_args[min_clients] = "2"  # the two devices still allowed
    resumed = fleet.start("server-resumed", "server.deploy", *server_args, "--resume")
    fleet.wait_for("the resumed server to finish", finished(resumed))

    assert resumed.proc.returncode == 0, fleet.log("server-resumed")[-4000:]
    assert "revoked node" in fleet.log("server-resumed")
    assert "exactly the 2 keys in --auth-keys" in fleet.log("server-resumed")
    assert rounds_in(out) == [1, 2]  # round 1 not repeated, round 2 done once
    summary = json.loads((out / "summary.json").read_text())
    assert [e["clients"] for e in summary["history"]] == [3, 2]  # the revoked device is out
    _, meta = load_checkpoint(out / "checkpoints" / "round-002.safetensors")
    assert meta["round"] == 2 and meta["accuracy"] == summary["final_accuracy"]
    assert "(resuming)" in fleet.log("server-resumed")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--tls-dir DIR"),
        (["--insecure", "--tls-dir", "."], "choose one of"),
        (["--tls-dir", "/nonexistent"], "lacks ca.crt, server.pem, server.key"),
        (["--insecure", "--auth-keys", "."], "--auth-keys needs TLS"),
        (["--insecure", "--run-config", "time-step=4"], "unknown key 'time-step'"),
        (["--insecure", "--resume"], "no valid checkpoint"),
        (["--insecure", "--address", "nowhere"], "not HOST:PORT"),
    ],
)
def test_server_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], needle):
    from typer.testing import CliRunner

    from server.deploy import cli

    base = {"--address": "127.0.0.1:1", "--rounds": "1", "--min-clients": "1",
            "--out": str(tmp_path / "run")}
    for flag in args:
        base.pop(flag, None)
    argv = [x for kv in base.items() for x in kv] + args
    result = CliRunner().invoke(cli, argv, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert not (tmp_path / "run" / "superlink").exists()  # nothing was started


@pytest.mark.parametrize("backend", ["openssl", "python"])
def test_generate_sh_writes_a_ca_and_a_server_certificate_for_the_hosts(tmp_path: Path, backend):
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    env = {**SCRIPT_ENV, "SPIKEFED_CERTS_WITH": backend}
    out = tmp_path / "tls"
    script = str(REPO / "deploy/certs/generate.sh")
    subprocess.run([script, str(out), "fl.example.org", "10.1.2.3"], check=True,
                   capture_output=True, env=env)
    context = ssl.create_default_context(cafile=str(out / "ca.crt"))
    context.load_cert_chain(str(out / "server.pem"), str(out / "server.key"))  # key matches
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"10.1.2.3", "127.0.0.1"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    again = subprocess.run([script, str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "already holds" in again.stderr  # never overwrites
    # the CA key lives apart from the server's files, and nothing there draws a warning
    from server.deploy import tls_dir_warnings

    assert not (out / "ca.key").exists() and (tmp_path / "tls-ca" / "ca.key").is_file()
    ca_key = load_pem_private_key((tmp_path / "tls-ca" / "ca.key").read_bytes(), None)
    assert ca_key.public_key().public_numbers() == ca.public_key().public_numbers()
    assert tls_dir_warnings(out) == []


@pytest.mark.parametrize("backend", ["ssh-keygen", "python"])
def test_node_keys_sh_writes_ecdsa_p384_openssh_key_pairs(tmp_path: Path, backend):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    env = {**SCRIPT_ENV, "SPIKEFED_CERTS_WITH": backend}
    subprocess.run([str(REPO / "deploy/certs/node-keys.sh"), str(tmp_path), "2"], check=True,
                   capture_output=True, env=env)
    for i in (1, 2):
        private = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), password=None)
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()


def test_resume_check_skips_a_corrupt_newest_checkpoint_with_a_message(tmp_path: Path, caplog):
    import torch

    from server.cli import UserError
    from server.deploy import check_out_dir
    from shared.checkpoint import save_checkpoint

    out = tmp_path / "run"
    for r in (1, 2):
        save_checkpoint(out / "checkpoints" / f"round-{r:03d}.safetensors",
                        {"w": torch.full((3,), float(r))}, {"round": r})
    newest = out / "checkpoints" / "round-002.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # cut short by a crash
    with caplog.at_level("WARNING"):
        assert check_out_dir(out, resume=True) == 1  # continues after round 1
    assert "round-002.safetensors" in caplog.text and "corrupt" in caplog.text
    with pytest.raises(UserError, match="already holds a run"):
        check_out_dir(out, resume=False)
    assert check_out_dir(tmp_path / "fresh", resume=False) == 0


def test_a_missing_nginx_is_one_line_naming_the_package(invoke, tmp_path: Path, monkeypatch):
    import server.deploy as deploy

    monkeypatch.setattr(deploy.shutil, "which", lambda name: None)
    monkeypatch.setattr(deploy.os, "access", lambda path, mode: False)
    result = invoke(deploy.cli, "--address", "127.0.0.1:1", "--insecure", "--rounds", "1",
                    "--min-clients", "1", "--out", str(tmp_path / "run"))
    assert result.code == 2 and "apt-get install nginx-light" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_server_warns_about_a_ca_key_and_readable_private_keys(tmp_path: Path):
    from server.deploy import tls_dir_warnings

    (tmp_path / "server.key").write_text("k")
    (tmp_path / "server.key").chmod(0o600)
    assert tls_dir_warnings(tmp_path) == []
    (tmp_path / "ca.key").write_text("k")
    (tmp_path / "ca.key").chmod(0o640)
    warnings = tls_dir_warnings(tmp_path)
    assert any("CA's private key" in w for w in warnings)
    assert any("ca.key is readable by others" in w for w in warnings)


def test_the_proxy_forwards_only_the_fleet_api_and_health(tmp_path: Path):
    from server.deploy import Endpoint, nginx_config

    conf = nginx_config(Endpoint("0.0.0.0", 9092), 40000, None, tmp_path)
    forwarded = [line.split()[1:] for line in conf.splitlines() if "location" in line]
    assert forwarded == [["/v1/fleet/", "{"], ["=", "/health", "{"], ["/", "{", "return", "404;",
                                                                     "}"]]
    assert "proxy_pass http://127.0.0.1:40000;" in conf and "listen 0.0.0.0:9092;" in conf
    assert "daemon" not in conf  # the guardian owns the process: -g 'daemon off;'


class FakeGrid:
    def __init__(self, connected: int) -> None:
        self.connected = connected
        self.run_id = 7

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.connected + 1))


def test_the_wait_for_devices_is_bounded_and_says_how_to_resume():
    from types import SimpleNamespace

    from server.federation import DevicesLost, DeviceWait

    now = [0.0]
    strategy = SimpleNamespace(min_available_nodes=3)
    grid = FakeGrid(connected=2)
    wait = DeviceWait(grid, strategy, deadline_s=30.0, clock=lambda: now[0])
    wait.done_rounds = 4
    assert wait.run_id == 7  # everything else is Flower's grid
    for now[0] in (0.0, 10.0, 30.0):
        assert len(wait.get_node_ids()) == 2  # Flower's sample_nodes keeps polling
    grid.connected = 3
    now[0] = 100.0
    assert len(wait.get_node_ids()) == 3  # enough again: the clock restarts
    grid.connected = 2
    wait.get_node_ids()
    now[0] = 130.5
    with pytest.raises(DevicesLost) as info:
        wait.get_node_ids()
    message = str(info.value)
    assert "for 3 devices, 2 connected" in message and "round 4" in message
    assert "--resume" in message and info.value.exit_code == 1
    strategy.min_available_nodes = 2  # what the Federation sets after the first round
    assert len(wait.get_node_ids()) == 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_a_guarded_command_ends_with_its_launcher_however_the_launcher_ends(tmp_path: Path, sig):
    """What the launchers rely on, without Flower: a grandchild in a new session (as SuperExec
    starts ServerApps and ClientApps) ends within seconds of the launcher's death."""
    launcher_code = (
        "import sys, time; from shared.process import start_guarded; "
        "g = start_guarded(['bash', '-c', 'setsid sleep 301 & sleep 302']); "
        "print(g.pid, flush=True); time.sleep(120)"
    )
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
    guardian = int(launcher.stdout.readline())
    deadline = time.monotonic() + 10
    while len(descendants(guardian)) < 3 and time.monotonic() < deadline:  # bash, 2 sleeps
        time.sleep(0.1)
    below = descendants(guardian)
    assert len(below) >= 3
    started = {pid: start_time(pid) for pid in [guardian, *below]}
    os.kill(launcher.pid, sig)
    launcher.wait()
    deadline = time.monotonic() + 10
    left = list(started)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in started if alive(p) and start_time(p) == started[p]]
    kill_all(left, grace_s=2.0)
    assert left == []
