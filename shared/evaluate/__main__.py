"""`python -m shared.evaluate` is `spikefed-evaluate`."""

from shared.evaluate.cli import run_cli

run_cli()
