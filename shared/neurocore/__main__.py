"""`python -m shared.neurocore`: profile one training step of a zoo model on the chip and write the
report to --out: report.json, rows.csv, core_scaling.csv and four PNG plots.

    python -m shared.neurocore --model csnn --time-steps 4 --cores 1,2,4,8,16,20 --out DIR
    python -m shared.neurocore --model resnet-mini --preset edge-int8 --out DIR
    python -m shared.neurocore --checkpoint runs/x/checkpoints/round-010.safetensors --out DIR
    python -m shared.neurocore --checkpoint runs/x --out DIR      # the run's newest round

The batch is the first --batch-size samples of the dataset split; the model is freshly
initialised (seed --seed) unless --checkpoint gives a trained one (rebuilt by
`shared.rebuild.load_global_model`). Bad input is a `shared.errors.UserError`: one line on stderr
and exit code 2 (`shared.cli.user_errors`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from shared.cli import user_errors
from shared.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def _cores(text: str) -> list[int]:
    try:
        cores = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--cores {text!r} is not a comma-separated list of integers (example: 1,2,4,8)"
        ) from None
    if not cores or min(cores) < 1:
        raise argparse.ArgumentTypeError(f"--cores {text!r}: core counts must be >= 1")
    return sorted(set(cores))


def _parser() -> argparse.ArgumentParser:
    from shared.neurocore.config import PRESETS

    p = _Parser(
        prog="python -m shared.neurocore",
        description="Account one SNN training step on the neuromorphic training chip model "
        "(exact op counts; cycles, bytes and energy are estimates).",
        epilog="example: python -m shared.neurocore --model csnn --time-steps 4 "
        "--cores 1,2,4,8,16,20 --out runs/neurocore-csnn",
    )
    p.add_argument("--model", default="csnn", help="csnn, mlp or resnet-mini (default csnn)")
    p.add_argument("--time-steps", type=int, default=4, help="SNN time steps T (default 4)")
    p.add_argument("--cores", type=_cores, default=[1, 2, 4, 8, 16, 20],
                   help="core counts of the scaling sweep (default 1,2,4,8,16,20)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--preset", default="paper-28nm-fp16",
                   help=f"chip preset: {', '.join(PRESETS)} (default paper-28nm-fp16)")
    p.add_argument("--precision", help="override the preset: fp16, int8 or int4")
    p.add_argument("--sparsity-skip", help="override the preset: none, input, output or dual")
    p.add_argument("--membrane", help="override the preset: store, mask or recompute")
    p.add_argument("--optimizer", help="override the preset: sgd or adam")
    p.add_argument("--chip-cores", type=int, help="override the preset's core count")
    p.add_argument("--dataset", default="mnist-subset", help="dataset (default mnist-subset)")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--batch-size", type=int, default=32, help="samples in the step (default 32)")
    p.add_argument("--neuron", default="lif", help="lif or if (default lif)")
    p.add_argument("--surrogate", default="atan", help="surrogate gradient (default atan)")
    p.add_argument("--weight-bits", type=int, default=32,
                   help="quantization-aware model with this many weight bits (default 32: float)")
    p.add_argument("--checkpoint", type=Path,
                   help="profile this trained model: a checkpoint or a run directory (its newest)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and CSV only")
    return p


def _chip(args: argparse.Namespace) -> Any:
    from shared.neurocore import ChipConfig

    overrides = {
        key: value
        for key, value in (
            ("precision", args.precision),
            ("sparsity_skip", args.sparsity_skip),
            ("membrane", args.membrane),
            ("optimizer", args.optimizer),
            ("cores", args.chip_cores),
        )
        if value is not None
    }
    return ChipConfig.preset(args.preset, **overrides)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    import torch

    from shared.data import dataset_info, load_dataset
    from shared.neurocore import NeuroCore, dense_workload_tflops_per_w
    from shared.quant import QuantError
    from shared.rebuild import build_from_spec, load_global_model
    from shared.snn import MODELS, SURROGATES, model_layout

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.time_steps < 1:
        raise UserError(f"--time-steps must be >= 1, got {args.time_steps}")
    for option, value, allowed in (
        ("--model", args.model, list(MODELS)),
        ("--neuron", args.neuron, ["lif", "if"]),
        ("--surrogate", args.surrogate, list(SURROGATES)),
        ("--split", args.split, ["train", "test"]),
    ):
        if value not in allowed:
            raise UserError(f"{option} {value!r} is not one of: {', '.join(allowed)}")
    config = _chip(args)
    torch.manual_seed(args.seed)
    if args.checkpoint is not None:
        trained = load_global_model(args.checkpoint)
        model, spec = trained.model, trained.spec
        dataset = trained.meta.get("dataset", args.dataset)
    else:
        info = dataset_info(args.dataset)
        spec = {
            "name": args.model, "in_channels": info.in_channels, "num_classes": info.num_classes,
            "input_size": info.input_size, "time_steps": args.time_steps, "neuron": args.neuron,
            "surrogate": args.surrogate, "weight_bits": args.weight_bits,
        }
        dataset = args.dataset
        try:
            model = build_from_spec(spec)
        except QuantError as err:
            raise UserError(f"--weight-bits {args.weight_bits}: {err}") from None
    x, y = load_dataset(dataset, args.split).tensors
    x, y = model_layout(x[: args.batch_size]), y[: args.batch_size]
    chip = NeuroCore(config)
    dense = dense_workload_tflops_per_w(config.replace(precision="fp16"))
    calibration = {
        "target_tflops_per_w": config.target_tflops_per_w,
        "core_energy_scale": chip.energy_scale,
        "dense_workload_tflops_per_w_fp16": dense,
    }
    report = chip.write_report(
        model, x, y, args.out, core_sweep=args.cores, model_name=spec["name"],
        extra={"preset": args.preset, "dataset": dataset, "split": args.split,
               "model_spec": spec, "calibration": calibration},
        plots=not args.no_plots,
    )
    print(
        f"{spec['name']} T={report.meta['time_steps']} B={report.meta['batch_size']} on "
        f"{args.preset} ({config.cores} cores, {config.precision}, skip {config.sparsity_skip}): "
        f"{report.energy_j * 1e3:.4g} mJ, {report.cycles:,} cycles "
        f"({report.seconds * 1e3:.3g} ms), "
        f"DRAM {report.dram_bytes / 1e6:.3g} MB vs A100 {(report.gpu_dram_bytes or 0) / 1e6:.3g} "
        f"MB ({report.dram_reduction or 0:.1%} less)"
    )
    print(
        f"calibration: dense fp16 workload {dense:.3f} TFLOPS/W "
        f"(target {config.target_tflops_per_w}, core energy x{chip.energy_scale:.3f}); "
        f"report: {args.out / 'report.json'} (estimates)"
    )
    return report.to_dict()


@user_errors
def main(argv: list[str] | None = None) -> int:
    """`run`; a `UserError` (bad flag, chip config, dataset or checkpoint) exits with one line."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
