"""Evaluation of a global model: accuracy, integer-engine exactness, accuracy over T (or the
dual-phase conversion sweep), attacks, and chip energy; and the `spikefed-evaluate` command.

    spikefed-evaluate runs/quick/checkpoints/round-002.safetensors --json eval.json --report eval.md

- `options`: `EvalOptions`, the light set `spikefed-run` ends with, the option parsers.
- `pipeline`: the stages and `evaluate_checkpoint`, the whole pipeline behind the command and the
  end of `spikefed-run` (attack scores come from `shared.attack.metrics`).
- `render`: the tables (built once; rich on the console, Markdown in the report), JSON, report.
- `cli`: the typer command.

The per-round loss/accuracy loop is `shared.snn.inference.evaluate_model`; models come back from
checkpoints through `shared.rebuild.load_global_model`.
"""

from .cli import run_cli
from .options import LIGHT, EvalOptions, EvaluateError, light_options
from .pipeline import evaluate_checkpoint
from .render import console_tables, markdown, write_json, write_report

__all__ = [
    "LIGHT",
    "EvalOptions",
    "EvaluateError",
    "console_tables",
    "evaluate_checkpoint",
    "light_options",
    "markdown",
    "run_cli",
    "write_json",
    "write_report",
]
