"""`spikefed-client`: one edge client, a Flower SuperNode that runs `client.app:app` for the server.

Before starting the SuperNode it checks that the server answers on its `/health` endpoint (over TLS
with `--ca-cert` unless `--insecure`), for at most `--connect-timeout` seconds: an unreachable
server is one line on stderr and exit code 1, a certificate that does not verify is exit code 2.
The SuperNode then gets the same bound (`--max-wait-time`), so a client that loses its server gives
up instead of retrying forever. Its node config is `partition-id` + `num-partitions` (a share of a
built-in dataset) or `data-dir` (the device's own data); the server sends everything else.
`--app-hash` pins the app (FAB) the device runs (`client/pin`); the SuperNode and everything it
starts run under a guardian (`shared.process`) and end with this process, however it ends.
`--device-profile FILE` (a device-profile file, or a fleet file with `--device NAME`) makes the
node a device with a profile (`shared.fleet`): it trains on that chip and reports its modelled
seconds and joules in every train reply (node config `device-profile`, `device-name`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from client.pin.sitecustomize import PIN_ENV, REFUSED
from shared.cli import CertificateError, err_console, user_errors, wait_for_health
from shared.errors import EXIT_FAILURE, UserError
from shared.fleet import load_profile
from shared.process import ProcessTree, start_guarded

EXIT_UNREACHABLE = EXIT_FAILURE
PIN_DIR = Path(__file__).resolve().parent / "pin"  # its sitecustomize.py pins the app

cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


class ClientError(UserError):
    """A one-line failure of `spikefed-client`; exit code 2 (usage) unless given."""


def check_server_address(text: str) -> str:
    """`HOST:PORT` or `[IPv6]:PORT`, as the SuperNode's `--superlink` expects it."""
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]/]+):\d{1,5}", text.strip()):
        raise ClientError(f"--server '{text}' is not HOST:PORT (example: server.example.org:9092)")
    return text.strip()


def node_config(partition_id: int | None, num_partitions: int | None,
                data_dir: Path | None) -> str:
    """The SuperNode's `--node-config`: a partition of the built-in data, or a local directory."""
    if data_dir is not None:
        if partition_id is not None or num_partitions is not None:
            raise ClientError("give either --data-dir or --partition-id/--num-partitions, not both")
        if not data_dir.is_dir():
            raise ClientError(f"--data-dir {data_dir} is not a directory")
        path = str(data_dir.expanduser().resolve())
        if re.search(r'[\s"\\]', path):
            raise ClientError(f"--data-dir {path}: use a path without spaces, quotes, backslashes")
        return f'data-dir="{path}"'
    if partition_id is None or num_partitions is None:
        raise ClientError("say which data this client trains on: --partition-id I --num-partitions "
                          "N (a share of a built-in dataset) or --data-dir DIR")
    if not 0 <= partition_id < num_partitions:
        raise ClientError(f"--partition-id {partition_id} must be in 0..{num_partitions - 1} "
                          f"(--num-partitions {num_partitions})")
    return f"partition-id={partition_id} num-partitions={num_partitions}"


def device_config(profile: Path | None, device: str | None) -> str:
    """The node config that names this device's profile (checked here, so a bad file is one
    line now rather than a failed round later); empty without `--device-profile`."""
    if profile is None:
        if device is not None:
            raise ClientError("--device needs --device-profile FLEET.toml (the fleet it is in)")
        return ""
    if device is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,60}", device):
        raise ClientError(f"--device {device!r}: a device or class name of the fleet file "
                          "(letters, digits, '-', '_', '.')")
    path = str(profile.expanduser().resolve())
    if re.search(r'[\s"\\]', path):
        raise ClientError(f"--device-profile {path}: use a path without spaces, quotes, "
                          "backslashes")
    klass, found = load_profile(path, device)
    chip = found.chip
    print(f"spikefed-client: device {device or klass}: {chip.cores} cores at "
          f"{chip.clock_mhz:g} MHz ({chip.precision}), {found.uplink_mbps:g}/"
          f"{found.downlink_mbps:g} Mbit/s up/down, {found.radio}", flush=True)
    return f'device-profile="{path}"' + (f' device-name="{device}"' if device else "")


def check_auth_key(path: Path) -> Path:
    """An OpenSSH ECDSA private key (what `ssh-keygen -t ecdsa -b 384` or node-keys.sh writes)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise ClientError(f"--auth-key {path}: {err.strerror}") from None
    except (ValueError, TypeError) as err:
        raise ClientError(f"--auth-key {path} is not an unencrypted OpenSSH private key "
                          f"({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ClientError(f"--auth-key {path} is not an ECDSA key; create one with "
                          "deploy/certs/node-keys.sh DIR N")
    return path.resolve()


def wait_for_server(server: str, ca_cert: Path | None, timeout_s: float) -> None:
    """Wait until the server's `/health` answers (https with --ca-cert), at most `timeout_s`
    seconds. Certificate errors fail at once: waiting would not fix them."""
    url = f"{'https' if ca_cert else 'http'}://{server}/health"
    try:
        wait_for_health(url, ca_cert, timeout_s, every_s=1.0)
    except CertificateError as err:
        raise ClientError(
            f"the server at {server} has a certificate that --ca-cert {ca_cert} does not "
            f"verify ({err}); use the ca.crt the server's certificates were made with, and a "
            "host name they list"
        ) from None
    except TimeoutError as err:
        raise ClientError(
            f"cannot reach the server at {server} after {timeout_s:g} s ({err}); check "
            "--server, that spikefed-server runs there and that the port is open",
            EXIT_UNREACHABLE,
        ) from None


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the SuperNode's local Runtime API (so that several clients
    can share a machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def supernode_command(server: str, ca_cert: Path | None, auth_key: Path | None, config: str,
                      timeout_s: float) -> list[str]:
    tool = Path(sys.executable).parent / "flower-supernode"
    cmd = [str(tool) if tool.exists() else "flower-supernode", "--superlink", server]
    cmd += ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += ["--node-config", config, "--port", str(free_port()),
            "--max-wait-time", str(timeout_s)]
    return cmd


_running: list[Attempt] = []  # the SuperNode attempt under way, for the signal handler
_stopping = threading.Event()


def _stop_on_signals() -> None:
    """SIGTERM / SIGINT end the SuperNode attempt under way (its guardian ends everything below
    it) instead of raising inside a thread wait, where CPython may lose the exception."""

    def handler(signum: int, frame: object) -> None:
        _stopping.set()
        if not _running:
            raise KeyboardInterrupt
        for attempt in _running:
            if attempt.tree.proc.poll() is None:
                attempt.tree.proc.terminate()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Attempt:
    """One SuperNode process. Its log is held back until the server has activated the node (so
    a refused attempt, retried, stays quiet) and copied to stdout from then on."""

    ACTIVATED = "SuperNode ID:"

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.tree = ProcessTree(start_guarded(cmd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, bufsize=1))
        self.activated = False
        self.held: list[str] = []
        # the SuperNode's children inherit the pipe until the guardian has ended them: read it
        # on the side and wait for the process itself
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.tree.proc.stdout is not None
        for line in self.tree.proc.stdout:
            if line.startswith(REFUSED):  # the app pin refused a run (client/pin)
                err_console.print(f"[bold red]error:[/] {line.strip()}", soft_wrap=True,
                                  markup=True, emoji=False)
                continue
            if self.activated:
                sys.stdout.write(line)
                sys.stdout.flush()
                continue
            self.held.append(line)
            if self.ACTIVATED in line:
                self.activated = True
                sys.stdout.writelines(self.held)
                sys.stdout.flush()

    def run(self) -> int:
        code = self.tree.proc.wait()
        self.tree.stop(grace_s=5.0)  # what it started, so that the pipe closes
        self.reader.join(5.0)
        return code

    @property
    def refused(self) -> bool:
        """The server answered but would not activate the node (e.g. its key is unregistered)."""
        return any("Failed to activate" in line for line in self.held)


def run_supernode(cmd: list[str], env: dict[str, str], deadline: float, what: str) -> None:
    """Run the SuperNode until it ends; a start the server refuses is retried until `deadline`
    (the server registers node keys just after it comes up)."""
    while True:
        attempt = Attempt(cmd, env)
        _running[:] = [attempt]
        try:
            code = attempt.run()
        finally:
            _running.clear()
        if _stopping.is_set():
            attempt.tree.stop()
            raise typer.Exit(130)
        if code == 0:
            return
        if attempt.activated:
            raise ClientError(f"the SuperNode stopped with exit code {code}: it lost the server "
                              "for longer than --connect-timeout (see its log above)",
                              EXIT_UNREACHABLE)
        if time.monotonic() >= deadline:
            if attempt.refused:
                raise ClientError(f"the server refused this node ({what}); ask its operator to "
                                  "register this node's public key (--auth-keys)",
                                  EXIT_UNREACHABLE)
            raise ClientError(f"the SuperNode could not join the server (exit code {code})",
                              EXIT_UNREACHABLE)
        time.sleep(1.0)


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-client --server server.example.org:9092 --ca-cert certs/ca.crt "
    "--partition-id 0 --num-partitions 5\n\n"
    "  spikefed-client --server 10.0.0.5:9092 --ca-cert ca.crt --auth-key keys/node-1 "
    "--data-dir /data/mnist\n\n"
    "  spikefed-client --server 127.0.0.1:9092 --insecure --partition-id 1 --num-partitions 2\n\n"
    "  spikefed-client --server 10.0.0.5:9092 --ca-cert ca.crt --data-dir /data/mnist "
    "--device-profile deploy/fleets/edge-mix.toml --device phone-03"
)
@user_errors
def main(
    server: Annotated[str, typer.Option(help="HOST:PORT of spikefed-server.")],
    ca_cert: Annotated[
        Path | None, typer.Option(help="CA certificate that signed the server's (ca.crt).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Connect without TLS (lab networks only).")
    ] = False,
    auth_key: Annotated[
        Path | None, typer.Option(help="This node's private key, registered on the server.")
    ] = None,
    partition_id: Annotated[int | None, typer.Option(min=0, help="This node's partition.")] = None,
    num_partitions: Annotated[int | None, typer.Option(min=1, help="Partitions in all.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Train on this local dataset directory instead.")
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to keep trying to reach the server.")
    ] = 60.0,
    app_hash: Annotated[
        str | None,
        typer.Option(help="Run only the app (FAB) with this sha256, as spikefed-server prints "
                     "it; any other run is refused before its code is unpacked."),
    ] = None,
    device_profile: Annotated[
        Path | None,
        typer.Option(help="This device's profile (TOML: chip, link, energy), or a fleet file "
                     "with --device: the node trains on that chip and reports its modelled "
                     "time and energy."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="With a fleet file as --device-profile: this device's name "
                     "(e.g. phone-03) or class."),
    ] = None,
) -> None:
    """Start one edge client (a Flower SuperNode) that trains the spikefed SNN on its data."""
    server = check_server_address(server)
    if not math.isfinite(connect_timeout):
        raise ClientError(f"--connect-timeout {connect_timeout} is not a number of seconds "
                          "(example: --connect-timeout 60)")
    if (ca_cert is None) == (not insecure):
        raise ClientError("choose one of --ca-cert FILE (TLS, the default way) or --insecure")
    if ca_cert is not None and not ca_cert.is_file():
        raise ClientError(f"--ca-cert {ca_cert} is not a file (the server's ca.crt)")
    if auth_key is not None and insecure:
        raise ClientError("--auth-key needs TLS; use --ca-cert instead of --insecure")
    if app_hash is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", app_hash.strip()):
        raise ClientError(f"--app-hash {app_hash!r} is not a sha256 (64 hex digits, as "
                          "spikefed-server prints it)")
    config = node_config(partition_id, num_partitions, data_dir)
    profile = device_config(device_profile, device)
    if profile:
        config = f"{config} {profile}"
    key = check_auth_key(auth_key) if auth_key is not None else None
    ca = ca_cert.resolve() if ca_cert else None
    if insecure:
        err_console.print("[bold yellow]warning:[/] --insecure: traffic to the server is not "
                          "encrypted", soft_wrap=True)
    deadline = time.monotonic() + connect_timeout
    wait_for_server(server, ca, connect_timeout)
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if app_hash is not None:
        env[PIN_ENV] = app_hash.strip().lower()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PIN_DIR), os.environ.get("PYTHONPATH")) if p)
    else:
        err_console.print("[bold yellow]warning:[/] no --app-hash: this device runs any app the "
                          "server submits", soft_wrap=True)
    print(f"spikefed-client: {config} -> {server}", flush=True)
    _stop_on_signals()
    what = f"key {auth_key}" if auth_key else "no --auth-key given"
    try:
        run_supernode(supernode_command(server, ca, key, config, connect_timeout), env, deadline,
                      what)
    except KeyboardInterrupt:  # between two attempts: nothing runs below us
        raise typer.Exit(130) from None


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
