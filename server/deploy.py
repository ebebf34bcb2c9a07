"""`spikefed-server`: the federation's server for real edge clients, on Flower's deployment engine.

Two processes serve the federation. The Flower SuperLink (Fleet, Control and Runtime HTTP API on
one port) listens on loopback only, `127.0.0.1:--admin-port`: the operator's `flwr` commands, our
run submission and the ServerApp reach it there. nginx, a TLS-terminating reverse proxy from
Debian's packages, listens on `--address`, the address devices use, and forwards only the Fleet
API (`/v1/fleet/`) and `/health`; the Control API, the Runtime API, `/docs` and `/openapi.json`
answer 404 there. With TLS, nginx presents server.pem and speaks TLS to the SuperLink too (Flower
requires TLS for node authentication), verifying it against ca.crt.

`spikefed-server` waits until `/health` answers through the proxy, makes the SuperLink's
registered node keys equal to `--auth-keys`, submits this app (`server.app:app` +
`client.app:app`, built into a FAB by `flwr run`) with the resolved run config, streams the run's
log, and stops everything when the run has finished (unless `--keep-alive`). Every process runs
under a guardian (`shared.process.start_guarded`), so that any end of `spikefed-server`, SIGKILL
included, ends the SuperLink, SuperExec, ServerApp and nginx too. The ServerApp writes the same
`runs` layout as `spikefed-run` (metrics.jsonl, checkpoints, summary.json) into `--out`;
`deployment.json` adds the run id, status and the bytes the SuperLink counted on its Fleet API.
We write no transport: all of it is Flower's and nginx's.

    <out>/superlink/state.db  superlink.log  config.toml (the CLI connection)  run-config.toml
    <out>/superlink/nginx/    nginx.conf  error.log  access.log  nginx.pid  temp/
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from server.app import RESUME_ENV
from server.cli import UserError, err_console, resolve_config, user_errors
from shared.cli import CertificateError, wait_for_health
from shared.config import RunConfig
from shared.errors import EXIT_FAILURE
from shared.fleet import load_fleet
from shared.process import ProcessTree, start_guarded
from shared.rundir import DirLock, RunDir

APP_ROOT = Path(__file__).resolve().parent.parent  # holds pyproject.toml: the Flower app
CONNECTION = "spikefed"  # the SuperLink connection name in the private config.toml
TLS_FILES = ("ca.crt", "server.pem", "server.key")
HEALTH_TIMEOUT_S = 60.0
PORT_WAIT_S = 15.0  # a restart right after a crash: the old listeners are ending
FLEET_PATHS = ("/v1/fleet/", "/health")  # all the devices' address serves
NGINX_PACKAGE = "nginx-light"

console = Console(highlight=False)
cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


class ServerFailure(UserError):
    """The SuperLink or the run failed (not a usage error): one line, exit code 1."""

    exit_code = EXIT_FAILURE


@dataclass(frozen=True)
class Endpoint:
    """Where the SuperLink listens (`host`, `port`) and how the local CLI reaches it."""

    host: str
    port: int

    @property
    def listen(self) -> str:
        """`host:port` as nginx's `listen` and a URL write it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def local(self) -> str:
        """The address this machine's `flwr` CLI uses: loopback when bound to every interface."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_address(text: str) -> Endpoint:
    """`HOST:PORT` or `[IPv6]:PORT` -> Endpoint; a one-line UserError otherwise."""
    match = re.fullmatch(r"\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<p6>\d+)|(?P<host>[^:\s]+):(?P<port>\d+)",
                         text.strip())
    if not match:
        raise UserError(f"--address '{text}' is not HOST:PORT (example: 0.0.0.0:9092)")
    host = match["v6"] or match["host"]
    port = int(match["p6"] or match["port"])
    if not 0 < port < 65536:
        raise UserError(f"--address port {port} is out of range (1..65535)")
    return Endpoint(host, port)


def check_tls_dir(tls_dir: Path) -> dict[str, Path]:
    """The CA, certificate and key `deploy/certs/generate.sh` writes, all present and loadable."""
    files = {name: tls_dir / name for name in TLS_FILES}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise UserError(
            f"--tls-dir {tls_dir} lacks {', '.join(missing)}; "
            f"create them with deploy/certs/generate.sh {tls_dir} HOST..."
        )
    try:
        ssl.create_default_context(cafile=str(files["ca.crt"])).load_cert_chain(
            str(files["server.pem"]), str(files["server.key"])
        )
    except (ssl.SSLError, OSError) as err:
        raise UserError(f"--tls-dir {tls_dir}: the certificate files do not load ({err})") from None
    for warning in tls_dir_warnings(tls_dir):
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    return files


def tls_dir_warnings(tls_dir: Path) -> list[str]:
    """What in `--tls-dir` should not be there: the CA's private key (whoever holds it can make
    certificates every device trusts) and private keys others on this machine may read."""
    warnings = []
    if (tls_dir / "ca.key").exists():
        warnings.append(f"{tls_dir / 'ca.key'} is the CA's private key: keep it off the server "
                        "(move it offline; deploy/certs/generate.sh keeps it in DIR-ca)")
    for key in sorted(tls_dir.glob("*.key")):
        mode = key.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{key} is readable by others (mode {stat.filemode(mode)}); "
                            f"chmod 600 {key}")
    return warnings


def find_nginx() -> str:
    """The nginx binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        raise UserError(
            "spikefed-server needs nginx, the reverse proxy that keeps Flower's Control and "
            f"Runtime APIs off the devices' address: install Debian's {NGINX_PACKAGE} package "
            f"(sudo apt-get install {NGINX_PACKAGE})"
        )
    return found


def nginx_config(endpoint: Endpoint, admin_port: int, tls: dict[str, Path] | None,
                 root: Path) -> str:
    """nginx.conf for the devices' address: TLS with the server certificate (unless
    --insecure), the Fleet API and /health forwarded to the SuperLink on loopback, the rest 404.
    Every path nginx writes lies below `root`; no daemon (the guardian owns the process)."""
    upstream = f"{'https' if tls else 'http'}://127.0.0.1:{admin_port}"
    ssl_listen = " ssl" if tls else ""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers as the launcher's user
    lines = [
        f"{user}worker_processes 1;",
        f"pid {root / 'nginx.pid'};",
        f"error_log {root / 'error.log'} warn;",
        "events { worker_connections 1024; }",
        "http {",
        f"  access_log {root / 'access.log'};",
        *(f"  {kind}_temp_path {root / 'temp' / kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "  client_max_body_size 1g;  # model updates; Flower chunks larger objects",
        "  client_body_buffer_size 8m;",
        "  proxy_read_timeout 3600s;",
        "  proxy_send_timeout 3600s;",
        "  server_tokens off;",
        "  server {",
        f"    listen {endpoint.listen}{ssl_listen};",
    ]
    if tls:
        lines += [
            f"    ssl_certificate {tls['server.pem']};",
            f"    ssl_certificate_key {tls['server.key']};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            f"    proxy_ssl_trusted_certificate {tls['ca.crt']};",
            "    proxy_ssl_verify on;",
            "    proxy_ssl_name localhost;  # generate.sh always lists it; nginx checks DNS names",
        ]
    for path in FLEET_PATHS:
        match = "" if path.endswith("/") else "= "
        lines += [f"    location {match}{path} {{", f"      proxy_pass {upstream};",
                  "      proxy_http_version 1.1;", "      proxy_set_header Connection \"\";",
                  "    }"]
    lines += ["    location / { return 404; }", "  }", "}"]
    return "\n".join(lines) + "\n"


def nginx_command(nginx: str, root: Path) -> list[str]:
    return [nginx, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log"),
            "-g", "daemon off;"]


def wait_port_free(host: str, port: int, what: str, timeout_s: float = PORT_WAIT_S) -> None:
    """Wait until `host:port` can be bound (a crashed predecessor's listener is ending)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return
            except OSError as err:
                if err.errno != 98:  # EADDRINUSE; anything else will not go away
                    raise UserError(f"{what} {host}:{port} cannot be used: {err.strerror}"
                                    ) from None
        if time.monotonic() >= deadline:
            raise ServerFailure(f"{what} {host}:{port} is in use by another program; stop it or "
                                "choose another port")
        time.sleep(0.25)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_auth_keys(keys_dir: Path) -> list[Path]:
    """Every `*.pub` in `keys_dir`: OpenSSH elliptic-curve public keys of the allowed nodes."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not keys_dir.is_dir():
        raise UserError(f"--auth-keys {keys_dir} is not a directory of node public keys (*.pub)")
    keys = sorted(path.resolve() for path in keys_dir.glob("*.pub"))
    if not keys:
        raise UserError(
            f"--auth-keys {keys_dir} holds no *.pub file; create node keys with "
            "deploy/certs/node-keys.sh DIR N"
        )
    for path in keys:
        try:
            key = load_ssh_public_key(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"--auth-keys: {path} is not an OpenSSH public key ({err})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UserError(
                f"--auth-keys: {path} is not an ECDSA key; Flower node keys are ECDSA P-384 "
                "(ssh-keygen -t ecdsa -b 384)"
            )
    return keys


def check_out_dir(out: Path, resume: bool) -> int:
    """Refuse to overwrite a run without `--resume`, and to resume nothing, before any process
    starts (the ServerApp checks again); returns the round the run continues after."""
    return RunDir(out).check_start(resume)


def toml_value(value: Any) -> str:
    """A run-config value as TOML (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_connection(home: Path, endpoint: Endpoint, ca_cert: Path | None) -> None:
    """The `flwr` CLI's connection to our SuperLink, in the private FLWR_HOME."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{endpoint.local}"']
    lines.append(f"root-certificates = {json.dumps(str(ca_cert))}" if ca_cert
                 else "insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def superlink_command(
    endpoint: Endpoint, home: Path, tls: dict[str, Path] | None, auth: bool
) -> list[str]:
    cmd = [
        _tool("flower-superlink"),
        "--host", endpoint.host,
        "--port", str(endpoint.port),
        "--database", str(home / "state.db"),
        "--disable-runtime-dependency-installation",  # no network: the venv has every dependency
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls["ca.crt"]), "--ssl-certfile", str(tls["server.pem"]),
                "--ssl-keyfile", str(tls["server.key"])]
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def flower_env(home: Path, resume: bool = False) -> dict[str, str]:
    """Environment of every Flower process we start: private FLWR_HOME, no telemetry, this venv's
    tools on PATH (the SuperLink starts `flower-superexec`, which starts `flwr-serverapp`)."""
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop(RESUME_ENV, None)
    if resume:
        env[RESUME_ENV] = "1"
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def wait_healthy(
    proc: subprocess.Popen, endpoint: Endpoint, ca_cert: Path | None, log_path: Path,
    what: str = "the SuperLink",
) -> None:
    """Wait for `/health` at `endpoint` to answer 200; fail if `proc` (`what`) exits first."""
    url = f"{'https' if ca_cert else 'http'}://{endpoint.local}/health"

    def still_running() -> None:
        if proc.poll() is not None:
            raise ServerFailure(
                f"{what} exited with code {proc.returncode} at start: "
                f"{_last_error(log_path)} (full log: {log_path})"
            )

    try:
        wait_for_health(url, ca_cert, HEALTH_TIMEOUT_S, check=still_running)
    except CertificateError as err:
        raise UserError(
            f"the SuperLink's certificate does not verify for {endpoint.local} ({err}); "
            "spikefed-server reaches its own SuperLink there: make the certificates with "
            "deploy/certs/generate.sh"
        ) from None
    except TimeoutError as err:
        raise ServerFailure(
            f"{what} at {url} was not healthy after {HEALTH_TIMEOUT_S:.0f} s ({err}); "
            f"see {log_path}"
        ) from None


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "Errno" in ln]
    return (errors or lines or ["no output"])[-1]


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("flwr"), *args], env=env, capture_output=True, text=True,
                          cwd=env["FLWR_HOME"])


def _cli_message(text: str) -> str:
    """The words of the `flwr` CLI's output, without rich's box drawing, on one line."""
    words = (line.strip(" │╭╮╰╯─┃━") for line in text.splitlines())
    return " ".join(w for w in words if w and not w.startswith("Using SuperLink"))


def registered_nodes(db: Path) -> dict[int, bytes]:
    """The nodes the SuperLink's state database holds as registered: node id -> public key (PEM,
    as Flower stores it). Read-only; the SuperLink owns the database."""
    import sqlite3

    from flwr.supercore.utils import int64_to_uint64

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT node_id, public_key FROM node WHERE status != 'unregistered'"
                            " AND public_key IS NOT NULL").fetchall()
    return {int64_to_uint64(node_id): bytes(key) for node_id, key in rows}


def sync_keys(keys: list[Path], home: Path, env: dict[str, str]) -> None:
    """Make the registered device set equal the `--auth-keys` keys: register each one, then
    unregister (`flwr supernode unregister`) every node whose key is no longer there, e.g. a
    `.pub` removed since the last start: removing it revokes that device, `--resume` included."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    register_keys(keys, env)
    allowed = {public_key_to_bytes(load_ssh_public_key(k.read_bytes())) for k in keys}
    nodes = registered_nodes(home / "state.db")
    for node_id, key in sorted(nodes.items()):
        if key in allowed:
            continue
        done = _flwr(["supernode", "unregister", str(node_id), CONNECTION], env)
        text = _cli_message(done.stdout + done.stderr)
        if done.returncode != 0:
            raise ServerFailure(f"revoking node {node_id} (key not in --auth-keys) failed: {text}")
        console.print(f"revoked node {node_id}: its key is no longer in --auth-keys")
    left = registered_nodes(home / "state.db")
    if set(left.values()) != allowed:
        raise ServerFailure(f"the SuperLink holds {len(left)} registered nodes, --auth-keys "
                            f"{len(allowed)} keys; see {home / 'superlink.log'}")
    console.print(f"registered nodes: exactly the {len(allowed)} keys in --auth-keys")


def register_keys(keys: list[Path], env: dict[str, str]) -> None:
    """`flwr supernode register` each node public key (a key registered before is kept)."""
    for key in keys:
        done = _flwr(["supernode", "register", str(key), CONNECTION, "--name", key.stem], env)
        text = _cli_message(done.stdout + done.stderr)
        if "registered successfully" not in text and "already in use" not in text:
            raise ServerFailure(f"registering node key {key} failed: {text}")
        console.print(f"registered node key {key.name}")


def submit(config: RunConfig, home: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `flwr run` of this app with the resolved config and `--stream` (its output piped)."""
    run_config = home / "run-config.toml"
    run_config.write_text(
        "".join(f"{key} = {toml_value(value)}\n" for key, value in config.to_flwr().items())
    )
    cmd = [_tool("flwr"), "run", str(APP_ROOT), CONNECTION, "--run-config", str(run_config),
           "--stream"]
    return start_guarded(cmd, env=env, cwd=home, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)


def stream(proc: subprocess.Popen, env: dict[str, str]) -> int:
    """Copy the run's log stream to stdout until it ends; returns the run id it announced. Once
    the run has started, prints its app's (FAB's) sha256: the value devices pin."""
    run_id: int | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        found = re.search(r"Successfully started run (\d+)", line)
        if found and run_id is None:
            run_id = int(found[1])
            fab_hash = run_record(run_id, env).get("fab-hash", "")
            console.print(f"app (FAB) sha256 {fab_hash}: devices pin it with "
                          f"spikefed-client --app-hash {fab_hash}", soft_wrap=True)
    proc.wait()
    if run_id is None:
        raise ServerFailure(f"flwr run did not start the run (exit code {proc.returncode})")
    return run_id


def run_record(run_id: int, env: dict[str, str]) -> dict[str, Any]:
    """The SuperLink's record of a run: status, elapsed seconds, network traffic."""
    done = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
    try:
        return json.loads(done.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise ServerFailure(
            f"cannot read run {run_id}'s status: {done.stdout + done.stderr}"
        ) from None


def wait_finished(run_id: int, env: dict[str, str], timeout: float = 120.0) -> dict[str, Any]:
    """The run's record once the SuperLink reports it finished (the log stream may end first)."""
    deadline = time.monotonic() + timeout
    record = run_record(run_id, env)
    while not str(record.get("status", "")).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        record = run_record(run_id, env)
    return record


def _raise_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@cli.command(
    epilog="Examples:\n\n"
    "  deploy/certs/generate.sh certs server.example.org 10.0.0.5\n\n"
    "  spikefed-server --address 0.0.0.0:9092 --tls-dir certs --rounds 10 --min-clients 5 "
    "--out runs/fleet\n\n"
    "  spikefed-server --address 0.0.0.0:9092 --tls-dir certs --auth-keys keys --rounds 10 "
    "--min-clients 5 --out runs/fleet --resume\n\n"
    "  spikefed-server --address 127.0.0.1:9092 --insecure --rounds 2 --min-clients 2 "
    '--out runs/lab --run-config "dataset=digits model=mlp"\n\n'
    "  spikefed-server --address 0.0.0.0:9092 --tls-dir certs --rounds 20 --min-clients 10 "
    '--out runs/fleet --fleet deploy/fleets/edge-mix.toml --run-config '
    '"round-deadline-s=20 selection=aware fraction-train=0.2"'
)
@user_errors
def main(
    address: Annotated[
        str, typer.Option(help="HOST:PORT devices use (nginx: the Fleet API and /health only).")
    ],
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds (num-server-rounds).")],
    min_clients: Annotated[
        int, typer.Option(min=1, help="Clients that must be connected before a round starts.")
    ],
    out: Annotated[Path, typer.Option(help="Run directory (runs layout + SuperLink state).")],
    tls_dir: Annotated[
        Path | None,
        typer.Option(help="Directory with ca.crt, server.pem, server.key (generate.sh)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve without TLS (plain HTTP): lab networks only.")
    ] = False,
    auth_keys: Annotated[
        Path | None,
        typer.Option(help="Only nodes whose public key (*.pub in DIR) is registered may join."),
    ] = None,
    run_config: Annotated[
        str, typer.Option("--run-config", help='Overrides, e.g. "time-steps=2 lr=0.001".')
    ] = "",
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (metrics-port).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --out after its last good checkpoint."),
    ] = False,
    keep_alive: Annotated[
        bool,
        typer.Option("--keep-alive", help="Keep the SuperLink serving after the run (Ctrl-C)."),
    ] = False,
    admin_port: Annotated[
        int,
        typer.Option(min=0, max=65535, help="Loopback port of the SuperLink itself (Control and "
                     "Runtime API, for `flwr` commands); 0 = any free port."),
    ] = 0,
    fleet: Annotated[
        Path | None,
        typer.Option(help="Fleet file (TOML, deploy/fleets/): the devices' profiles; nodes get "
                     "them in the order they join, and selection and deadlines use them."),
    ] = None,
) -> None:
    """Launch the federation server for real edge clients (Flower SuperLink + the spikefed run)."""
    if (tls_dir is None) == (not insecure):
        raise UserError("choose one of --tls-dir DIR (TLS, the default way) or --insecure")
    if fleet is not None:
        load_fleet(fleet)  # a missing or bad file: one line, exit 2
    endpoint = parse_address(address)
    nginx = find_nginx()
    tls = check_tls_dir(tls_dir) if tls_dir is not None else None
    if auth_keys is not None and tls is None:
        raise UserError("--auth-keys needs TLS (Flower refuses node authentication without it); "
                        "use --tls-dir instead of --insecure")
    keys = check_auth_keys(auth_keys) if auth_keys is not None else []
    out = out.expanduser().resolve()  # the ServerApp runs elsewhere: paths must be absolute
    flags: dict[str, object] = {"num-server-rounds": rounds, "min-clients": min_clients,
                                "out-dir": str(out)}
    if fleet is not None:
        flags["fleet"] = str(fleet.expanduser().resolve())
    config = resolve_config(run_config, flags, metrics_port=metrics_port)
    if config.fleet and fleet is None:
        load_fleet(config.fleet)
    done_before = check_out_dir(out, resume)
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise UserError(f"{APP_ROOT} has no pyproject.toml: run spikefed-server from a source "
                        "checkout or an editable install (pip install -e .)")
    if insecure:
        err_console.print("[bold yellow]warning:[/] --insecure: the devices' address serves plain "
                          "HTTP; updates and node traffic are not encrypted", soft_wrap=True)

    home = out / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    server_lock = DirLock(home / ".lock", "spikefed-server")  # held until this process ends
    admin = Endpoint("127.0.0.1", admin_port or free_loopback_port())
    wait_port_free(endpoint.host, endpoint.port, "--address")
    wait_port_free(admin.host, admin.port, "--admin-port")
    ca_cert = tls["ca.crt"].resolve() if tls else None
    write_connection(home, admin, ca_cert)
    proxy_root = home / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (proxy_root / "temp" / kind).mkdir(parents=True, exist_ok=True)
    (proxy_root / "nginx.conf").write_text(nginx_config(endpoint, admin.port, tls, proxy_root))
    env = flower_env(home, resume)
    log_path = home / "superlink.log"
    _raise_on_sigterm()
    trees: list[ProcessTree] = []  # stopped in reverse order
    try:
        with log_path.open("a") as log_file:
            superlink = ProcessTree(start_guarded(
                superlink_command(admin, home, tls, bool(keys)), env=env, cwd=home,
                stdout=log_file, stderr=subprocess.STDOUT,
            ))
            trees.append(superlink)
        wait_healthy(superlink.proc, admin, ca_cert, log_path, "the SuperLink")
        proxy_log = proxy_root / "error.log"
        proxy = ProcessTree(start_guarded(nginx_command(nginx, proxy_root), cwd=proxy_root,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        trees.append(proxy)
        wait_healthy(proxy.proc, endpoint, ca_cert, proxy_log, "nginx")
        scheme = "plain HTTP" if insecure else "TLS"
        console.print(
            f"[bold]spikefed-server[/] devices: {endpoint.listen} (nginx, {scheme}: Fleet API "
            f"and /health only{', node auth' if keys else ''}); SuperLink: {admin.local} "
            f"(loopback: Control + Runtime API; FLWR_HOME={home} flwr ls {CONNECTION}); waiting "
            f"for {min_clients} clients; {config.num_server_rounds} rounds -> {out}"
            + (" (resuming)" if resume else "")
        )
        if keys:
            sync_keys(keys, home, env)
        flwr_run = ProcessTree(submit(config, home, env))
        trees.append(flwr_run)
        run_id = stream(flwr_run.proc, env)
        record = wait_finished(run_id, env)
        record["rounds-this-run"] = config.num_server_rounds - done_before
        (out / "deployment.json").write_text(json.dumps(record, indent=2) + "\n")
        status = record.get("status", "unknown")
        if status != "finished:completed":
            details = str(record.get("status-details", "")).removeprefix(
                "ServerApp failed with exception: ")
            raise ServerFailure(
                f"run {run_id} ended {status} ({details}); "
                f"see the log above and {log_path}"
            )
        _print_result(out, record)
        if keep_alive:
            console.print(f"--keep-alive: devices' address {endpoint.listen} and the SuperLink "
                          f"{admin.local} keep serving; Ctrl-C to stop them")
            superlink.proc.wait()
    except KeyboardInterrupt:
        err_console.print("stopping the SuperLink")
        raise typer.Exit(130) from None
    finally:
        for tree in reversed(trees):
            tree.stop()
        server_lock.release()


def _print_result(out: Path, record: dict[str, Any]) -> None:
    from server.run import summary_table

    summary = RunDir(out).read_summary()
    if summary["history"]:
        console.print(summary_table(summary))
    wire = record.get("network-traffic", {}).get("total-bytes", 0)
    rounds = max(1, record["rounds-this-run"])
    console.print(
        f"final accuracy [bold]{summary['final_accuracy']:.2%}[/] after {summary['rounds']} rounds;"
        f" this run {record.get('elapsed', 0):.0f}s, Fleet API traffic {wire / 1e6:.2f} MB "
        f"({wire / rounds / 1e6:.2f} MB/round); summary: {RunDir(out).summary_file}"
    )


def run_cli() -> None:
    cli()


if __name__ == "__main__":
    run_cli()
