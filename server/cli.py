"""What every spikefed command shares: run-config overrides and one-line user errors."""

from __future__ import annotations

import functools
import sys
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from shared.checkpoint import CheckpointError
from shared.config import ConfigError
from shared.data import DatasetError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, CheckpointError)


class RunError(ValueError):
    """A user error in how a run was started (output directory, resume)."""

EXIT_USAGE = 2

err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A mistake in how a command was called: printed as one line, exit code 2."""


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse `--run-config "key=value ..."`: values are TOML (`4`, `0.5`, `true`, `"csnn"`), and a
    bare word that is not valid TOML is taken as a string (`dataset=digits`)."""
    values: dict[str, Any] = {}
    for item in (text or "").split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"run config: '{item}' is not key=value (example: time-steps=4)")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw.strip("'\"")
    return values


def user_errors(fn: F) -> F:
    """Turn user errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + (UserError, RunError) as err:
            err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
            sys.exit(EXIT_USAGE)

    return wrapper  # type: ignore[return-value]
