"""The error types every part of spikefed shares. Importing this module is free (no torch).

- `UserError`: something the user can fix (a flag, a config value, a file). Its message is one
  line saying what is wrong and how to fix it; `shared.cli.user_errors` prints that line and exits
  with the error's `exit_code` (2 unless a subclass says otherwise). `ConfigError`,
  `DatasetError`, `CheckpointError`, `RunError` and every command's own error are `UserError`s.
- `Rejected`: a client reply that breaks the reply contract (`shared.reply`); `reason` is one
  short word the server counts (logs, `rejected_reasons`, Prometheus), `detail` says what was seen.
"""

from __future__ import annotations

EXIT_USAGE = 2  # a bad flag, value, file or directory
EXIT_FAILURE = 1  # the command was right but could not finish (server unreachable, run failed)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, the process exits with `exit_code`."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError, ValueError):
    """A bad run-config key or value (names the key, the value and what is allowed)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, corrupt or of an unknown format."""


class RunError(UserError, ValueError):
    """A user error in how a run was started (output directory, resume, devices)."""


class Rejected(ValueError):
    """A reply the server refuses; `reason` is one of `shared.reply.REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
