"""What every spikefed command shares: one-line user errors with exit code 2, never a traceback.

`server.cli` builds on this for the federation commands; `spikefed-evaluate` uses it directly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from shared.checkpoint import CheckpointError
from shared.config import ConfigError
from shared.data import DatasetError

EXIT_USAGE = 2

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A mistake in how a command was called: printed as one line, exit code 2."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, CheckpointError, UserError)


def user_errors(fn: F) -> F:
    """Turn user errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
            sys.exit(EXIT_USAGE)

    return wrapper  # type: ignore[return-value]
