"""The `spikefed-evaluate` command: parse the options, run the pipeline with a spinner, print the
tables, write the JSON and the report.

    spikefed-evaluate runs/quick/checkpoints/round-002.safetensors --json eval.json --report eval.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shared.cli import user_errors

from .options import (
    DEFAULT_ATTACKS,
    EvalOptions,
    check_chip,
    parse_attacks,
    parse_budget,
    parse_eps,
    parse_l0_budgets,
    parse_time_steps,
)
from .pipeline import evaluate_checkpoint
from .render import console_tables, write_json, write_report

cli = typer.Typer(add_completion=False, rich_markup_mode="rich")


@cli.command(
    epilog="Examples:\n\n"
    "  spikefed-evaluate runs/quick\n\n"
    "  spikefed-evaluate runs/quick/checkpoints/round-002.safetensors --json eval.json "
    "--report eval/report.md\n\n"
    "  spikefed-evaluate model.safetensors --time-steps 1,2,4 --attacks pgd-pdsg,pgd-atan,square "
    "--eps 4/255,8/255 --budget 8/255 --samples 500\n\n"
    "  spikefed-evaluate runs/events --l0-budgets 0.1%,0.5% --budget 0.5%"
)
@user_errors
def main(
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint (.safetensors with its .json) or a run directory (newest round).")],
    dataset: Annotated[str | None, typer.Option(
        help="Evaluate on this dataset [default: the checkpoint's].")] = None,
    data_dir: Annotated[str | None, typer.Option(
        help="Directory of a local dataset (mnist, cifar10).")] = None,
    time_steps: Annotated[str, typer.Option(help="T values of the sweep.")] = "1,2,4,8",
    attacks: Annotated[str, typer.Option(
        help="pgd-/fgsm-<estimator> (pdsg or a surrogate), square, sda, topk.")] =
        ",".join(DEFAULT_ATTACKS),
    eps: Annotated[str | None, typer.Option(
        help="L-inf budgets on images, e.g. 8/255,16/255 [default: the dataset's: 0.05..0.3 "
        "MNIST-like, 2/255..16/255 natural images].")] = None,
    l0_budgets: Annotated[str | None, typer.Option(
        help="L0 budgets on event frames as shares of a sample's entries, e.g. 0.1%,0.25% "
        "[default: 0.1%,0.25%,0.5%,1%].")] = None,
    budget: Annotated[str | None, typer.Option(
        help="The headline budget (robust accuracy): a radius on images (0.3, 8/255), a share "
        "on event frames (0.25%) [default: the dataset's standard].")] = None,
    restarts: Annotated[int, typer.Option(min=1, help="PGD random restarts.")] = 2,
    steps: Annotated[int, typer.Option(min=1, help="PGD steps (step size eps/4).")] = 10,
    queries: Annotated[int, typer.Option(min=1, help="Queries of the square search.")] = 500,
    checks: Annotated[bool, typer.Option(
        help="Run the checks' own attacks: large budget, 5x steps, transfer from the float "
        "twin.")] = True,
    samples: Annotated[int, typer.Option(min=1, help="Test inputs per attack.")] = 200,
    exact_samples: Annotated[int, typer.Option(
        min=1, help="Inputs the integer engine is compared on.")] = 1000,
    chip: Annotated[str, typer.Option(help="Chip preset of the energy model.")] = "edge-int8",
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results.")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write a Markdown report (plots go to plots/ beside it).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the attacks' random starts.")] = 0,
) -> None:
    """Evaluate a global model: accuracy, integer-engine exactness, accuracy over T (or the
    dual-phase conversion of a QC-ANN), attacks with PDSG, every fixed surrogate and a
    gradient-free search, robust accuracy (worst case per input) at the dataset's budgets with
    checks against gradient masking, chip energy."""
    options = EvalOptions(
        dataset=dataset, data_dir=data_dir, time_steps=parse_time_steps(time_steps),
        attacks=parse_attacks(attacks), eps=None if eps is None else parse_eps(eps),
        l0_budgets=None if l0_budgets is None else parse_l0_budgets(l0_budgets),
        budget=None if budget is None else parse_budget(budget), restarts=restarts,
        steps=steps, queries=queries, checks=checks, samples=samples,
        exact_samples=exact_samples, chip=check_chip(chip), seed=seed,
    )
    console = Console(highlight=False)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate_checkpoint(
            checkpoint, options, on_stage=lambda s: progress.update(task, description=s))
    for table in console_tables(result):
        console.print(table)
    if json_file:
        console.print(f"results: {write_json(result, json_file)}")
    if report:
        console.print(f"report: {write_report(result, report)}")


def run_cli() -> None:
    cli()
