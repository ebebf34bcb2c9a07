"""shared.cli: one line and the error's exit code for every user error; the one /health wait."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest
import typer
from support import free_port

from shared.cli import user_errors, wait_for_health
from shared.errors import EXIT_FAILURE, CheckpointError, ConfigError, RunError, UserError


def command(error: Exception) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    @user_errors
    def main() -> None:
        raise error

    return app


@pytest.mark.parametrize(
    ("error", "code"),
    [(UserError("bad flag"), 2), (ConfigError("run config: x"), 2),
     (CheckpointError("corrupt"), 2), (RunError("busy"), 2),
     (UserError("server gone", EXIT_FAILURE), 1)],
)
def test_every_user_error_is_one_line_with_its_exit_code(invoke, error, code):
    result = invoke(command(error))
    assert result.code == code
    assert result.stderr.strip().splitlines() == [f"error: {error}"]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("text", ["tensors missing ['conv.weight']", "--out /data/[/]run",
                                  "[bold]not bold[/bold]"])
def test_a_message_is_printed_as_it_is_never_as_markup(invoke, text):
    result = invoke(command(UserError(text)))
    assert result.code == 2 and result.stderr.strip() == f"error: {text}"


def test_other_exceptions_are_not_swallowed(invoke):
    with pytest.raises(KeyError, match="a bug"):  # a bug shows its traceback
        invoke(command(KeyError("a bug")))


def test_importing_the_cli_helpers_does_not_import_torch():
    code = "import sys, shared.cli, shared.errors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


def test_wait_returns_once_health_answers(health_server):
    wait_for_health(health_server, None, 5.0)


def test_wait_gives_up_after_the_bound_with_the_last_failure():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="refused"):
        wait_for_health(f"http://127.0.0.1:{free_port()}/health", None, 1.0, every_s=0.2)
    assert time.monotonic() - started < 10


def test_wait_stops_when_the_check_raises(health_server):
    def gone() -> None:
        raise RunError("the server exited")

    with pytest.raises(RunError, match="exited"):
        wait_for_health(health_server, None, 5.0, check=gone)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_meaningless_timeout_is_refused(bad):
    with pytest.raises(ValueError, match="timeout_s"):
        wait_for_health("http://127.0.0.1:1/health", None, bad)
