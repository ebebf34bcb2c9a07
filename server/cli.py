"""What the federation commands share: run-config overrides and resolving the run config.

One-line user errors come from `shared.cli` (`user_errors`) and `shared.errors`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from shared.cli import err_console, user_errors
from shared.config import RunConfig
from shared.errors import EXIT_USAGE, ConfigError, RunError, UserError

__all__ = ["EXIT_USAGE", "RunError", "UserError", "err_console", "parse_overrides",
           "resolve_config", "user_errors"]


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


def resolve_config(
    overrides_text: str | None, flags: Mapping[str, Any], *, metrics_port: int | None = None
) -> RunConfig:
    """The run config a command runs with: pyproject's defaults, then `--run-config`, then the
    command's own flags (`flags`, run-config keys; they win). `min-nodes` is lowered to
    `min-clients` when a run has fewer clients than it asks for."""
    overrides = parse_overrides(overrides_text)
    overrides.update(flags)
    if metrics_port is not None:
        overrides["metrics-port"] = metrics_port
    config = RunConfig.parse(overrides)
    if config.min_nodes > config.min_clients:
        config = config.replace(min_nodes=config.min_clients)
    return config
