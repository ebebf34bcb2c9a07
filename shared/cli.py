"""What every spikefed command shares: one-line user errors with their exit code, never a
traceback, and the one wait for a server's `/health` endpoint.

Importing this module is cheap (no torch): launchers that only start processes use it too.
"""

from __future__ import annotations

import functools
import math
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from shared.errors import EXIT_FAILURE, EXIT_USAGE, UserError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CertificateError", "UserError", "err_console",
           "user_errors", "wait_for_health"]

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a `UserError` into one line on stderr and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True,
                              emoji=False)
            sys.exit(err.exit_code)

    return wrapper  # type: ignore[return-value]


class CertificateError(UserError):
    """The server's TLS certificate does not verify against the CA given (waiting won't help)."""


def wait_for_health(
    url: str,
    ca_cert: Path | None,
    timeout_s: float,
    *,
    check: Callable[[], None] | None = None,
    every_s: float = 0.5,
) -> None:
    """Poll `url` (a `/health` endpoint, https with `ca_cert`) until it answers 200.

    Raises `CertificateError` at once when the certificate does not verify, `TimeoutError`
    (its message: the last failure seen) after `timeout_s` seconds. `check()` runs before each
    try and may raise to stop waiting (e.g. the server process already exited)."""
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(url, timeout=max(0.5, min(5.0, timeout_s)),
                                        context=context) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise CertificateError(err.reason.verify_message or str(err.reason)) from None
            last = str(err.reason)
        except (OSError, ssl.SSLError) as err:
            last = str(err)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(last)
        time.sleep(min(every_s, left))
