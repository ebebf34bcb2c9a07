"""What every spikefed command shares: run-config overrides and one-line user errors."""

from __future__ import annotations

import tomllib
from typing import Any

from shared.cli import EXIT_USAGE, USER_ERRORS, UserError, err_console, user_errors
from shared.config import ConfigError

__all__ = ["EXIT_USAGE", "USER_ERRORS", "RunError", "UserError", "err_console",
           "parse_overrides", "user_errors"]


class RunError(UserError, ValueError):
    """A user error in how a run was started (output directory, resume)."""


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
