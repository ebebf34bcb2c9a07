"""spikefed-client's own checks: bad flags and an unreachable server end in one line, no traceback,
and a bounded wait (real processes; the dead address is a free port nobody listens on)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def spikefed_client(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_HOME": str(cwd / "home"),
           "COLUMNS": "200"}
    # the timeout only keeps a broken client from hanging the suite (it would retry forever)
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens there


@pytest.fixture(scope="module")
def ca_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "tls"
    subprocess.run([str(REPO / "deploy/certs/generate.sh"), str(out)], check=True,
                   capture_output=True)
    return out / "ca.crt"


def test_dead_address_gives_up_after_the_bound_with_one_line(tmp_path: Path, ca_cert: Path):
    result = spikefed_client("--server", dead_address(), "--ca-cert", str(ca_cert),
                             "--partition-id", "0", "--num-partitions", "2",
                             "--connect-timeout", "3", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the server" in lines[0] and "after 3 s" in lines[0]


def test_a_server_certificate_from_another_ca_is_refused_at_once(tmp_path: Path, ca_cert: Path):
    """A TLS server whose certificate the client's CA did not sign: exit 2, one line."""
    import ssl
    import threading

    other = tmp_path / "other"
    subprocess.run([str(REPO / "deploy/certs/generate.sh"), str(other)], check=True,
                   capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(other / "server.pem", other / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(5):  # handshakes fail on the client's side; accept a few attempts
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = spikefed_client("--server", f"127.0.0.1:{port}", "--ca-cert", str(ca_cert),
                                 "--partition-id", "0", "--num-partitions", "2",
                                 "--connect-timeout", "30", cwd=tmp_path)
    finally:
        listener.close()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not verify" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--partition-id", "0", "--num-partitions", "2"], "--ca-cert FILE"),
        (["--insecure", "--ca-cert", "ca.crt", "--partition-id", "0", "--num-partitions", "2"],
         "choose one of"),
        (["--ca-cert", "missing.crt", "--partition-id", "0", "--num-partitions", "2"],
         "is not a file"),
        (["--insecure"], "say which data"),
        (["--insecure", "--partition-id", "2", "--num-partitions", "2"], "must be in 0..1"),
        (["--insecure", "--data-dir", "nowhere"], "is not a directory"),
        (["--insecure", "--data-dir", ".", "--partition-id", "0"], "not both"),
        (["--insecure", "--auth-key", "k", "--partition-id", "0", "--num-partitions", "2"],
         "needs TLS"),
        (["--insecure", "--partition-id", "0", "--num-partitions", "2", "--connect-timeout",
          "nan"], "--connect-timeout nan is not a number of seconds"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], needle: str):
    (tmp_path / "ca.crt").write_text("not used")
    result = spikefed_client("--server", dead_address(), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_auth_key_must_be_an_ecdsa_openssh_private_key(tmp_path: Path, ca_cert: Path):
    (tmp_path / "node.pub").write_text("ssh-ed25519 AAAA not a private key\n")
    result = spikefed_client("--server", dead_address(), "--ca-cert", str(ca_cert),
                             "--auth-key", "node.pub", "--partition-id", "0",
                             "--num-partitions", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "is not an unencrypted OpenSSH private key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_app_hash_must_be_a_sha256(tmp_path: Path):
    result = spikefed_client("--server", dead_address(), "--insecure", "--partition-id", "0",
                             "--num-partitions", "2", "--app-hash", "abc", cwd=tmp_path)
    assert result.returncode == 2 and "--app-hash 'abc' is not a sha256" in result.stderr
