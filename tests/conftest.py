"""Fixtures the whole suite shares; the plain builders (Flower messages outside a run, free
loopback ports) are in support.py (`from support import message, reply, free_port`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class Outcome:
    """What an in-process command run printed and returned."""

    code: int
    stdout: str
    stderr: str


@pytest.fixture
def invoke(capsys):
    """Run a typer app in-process: `invoke(app, *args)` -> Outcome(code, stdout, stderr)."""
    from typer.main import get_command

    def run(app, *args: str) -> Outcome:
        command = get_command(app)
        try:
            command.main(list(args), prog_name="spikefed", standalone_mode=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run
