"""`spikefed-server`: the federation's server for real edge clients, on Flower's deployment engine.

It starts a Flower SuperLink (Fleet + Control + Runtime HTTP API on one port, TLS unless
`--insecure`, state database and a private FLWR_HOME under `--out/superlink/`), waits until its
`/health` answers, registers the node public keys of `--auth-keys`, submits this app
(`server.app:app` + `client.app:app`, built into a FAB by `flwr run`) with the resolved run config,
streams the run's log, and stops the SuperLink when the run has finished (unless `--keep-alive`).
The ServerApp writes the same `runs` layout as `spikefed-run` (metrics.jsonl, checkpoints,
summary.json) into `--out`; `deployment.json` adds the run id, status and the bytes the SuperLink
counted on its Fleet API. We write no transport: all of it is Flower's.

    <out>/superlink/state.db  superlink.log  config.toml (the CLI connection)  run-config.toml
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
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
from shared.process import ProcessTree
from shared.rundir import RunDir

APP_ROOT = Path(__file__).resolve().parent.parent  # holds pyproject.toml: the Flower app
CONNECTION = "spikefed"  # the SuperLink connection name in the private config.toml
TLS_FILES = ("ca.crt", "server.pem", "server.key")
HEALTH_TIMEOUT_S = 60.0

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
    return files


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
    proc: subprocess.Popen, endpoint: Endpoint, ca_cert: Path | None, log_path: Path
) -> None:
    """Wait for the SuperLink's `/health` to answer 200; fail if the process exits first."""
    url = f"{'https' if ca_cert else 'http'}://{endpoint.local}/health"

    def still_running() -> None:
        if proc.poll() is not None:
            raise ServerFailure(
                f"the SuperLink exited with code {proc.returncode} at start: "
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
            f"the SuperLink at {url} was not healthy after {HEALTH_TIMEOUT_S:.0f} s ({err}); "
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
    return subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def stream(proc: subprocess.Popen) -> int:
    """Copy the run's log stream to stdout until it ends; returns the run id it announced."""
    run_id: int | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        found = re.search(r"Successfully started run (\d+)", line)
        if found:
            run_id = int(found[1])
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
    '--out runs/lab --run-config "dataset=digits model=mlp"'
)
@user_errors
def main(
    address: Annotated[str, typer.Option(help="HOST:PORT the SuperLink listens on (all APIs).")],
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
) -> None:
    """Launch the federation server for real edge clients (Flower SuperLink + the spikefed run)."""
    if (tls_dir is None) == (not insecure):
        raise UserError("choose one of --tls-dir DIR (TLS, the default way) or --insecure")
    endpoint = parse_address(address)
    tls = check_tls_dir(tls_dir) if tls_dir is not None else None
    if auth_keys is not None and tls is None:
        raise UserError("--auth-keys needs TLS (Flower refuses node authentication without it); "
                        "use --tls-dir instead of --insecure")
    keys = check_auth_keys(auth_keys) if auth_keys is not None else []
    out = out.expanduser().resolve()  # the ServerApp runs elsewhere: paths must be absolute
    config = resolve_config(run_config, {"num-server-rounds": rounds, "min-clients": min_clients,
                                          "out-dir": str(out)}, metrics_port=metrics_port)
    done_before = check_out_dir(out, resume)
    if not (APP_ROOT / "pyproject.toml").is_file():
        raise UserError(f"{APP_ROOT} has no pyproject.toml: run spikefed-server from a source "
                        "checkout or an editable install (pip install -e .)")
    if insecure:
        err_console.print("[bold yellow]warning:[/] --insecure: the SuperLink serves plain HTTP; "
                          "updates and node traffic are not encrypted", soft_wrap=True)

    home = out / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    ca_cert = tls["ca.crt"].resolve() if tls else None
    write_connection(home, endpoint, ca_cert)
    env = flower_env(home, resume)
    log_path = home / "superlink.log"
    _raise_on_sigterm()
    superlink: ProcessTree | None = None
    flwr_run: ProcessTree | None = None
    try:
        with log_path.open("a") as log_file:
            superlink = ProcessTree(subprocess.Popen(
                superlink_command(endpoint, home, tls, bool(keys)), env=env, cwd=home,
                stdout=log_file, stderr=subprocess.STDOUT,
            ))
        wait_healthy(superlink.proc, endpoint, ca_cert, log_path)
        scheme = "plain HTTP" if insecure else "TLS"
        console.print(
            f"[bold]spikefed-server[/] SuperLink on {endpoint.host}:{endpoint.port} ({scheme}"
            f"{', node auth' if keys else ''}); waiting for {min_clients} clients; "
            f"{config.num_server_rounds} rounds -> {out}" + (" (resuming)" if resume else "")
        )
        register_keys(keys, env)
        flwr_run = ProcessTree(submit(config, home, env))
        run_id = stream(flwr_run.proc)
        record = wait_finished(run_id, env)
        record["rounds-this-run"] = config.num_server_rounds - done_before
        (out / "deployment.json").write_text(json.dumps(record, indent=2) + "\n")
        status = record.get("status", "unknown")
        if status != "finished:completed":
            raise ServerFailure(
                f"run {run_id} ended {status} ({record.get('status-details', '')}); "
                f"see the log above and {log_path}"
            )
        _print_result(out, record)
        if keep_alive:
            console.print(f"--keep-alive: the SuperLink keeps serving {endpoint.local}; "
                          "Ctrl-C to stop it")
            superlink.proc.wait()
    except KeyboardInterrupt:
        err_console.print("stopping the SuperLink")
        raise typer.Exit(130) from None
    finally:
        for tree in (flwr_run, superlink):
            if tree is not None:
                tree.stop()


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
