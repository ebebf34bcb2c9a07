"""Training in the chip's arithmetic: accuracy, chip energy per round and training-step speed of
train-precision float, fp16 and int8, side by side in one run.

Accuracy and energy: the default federation (`spikefed-run`: csnn, mnist-subset, 5 clients,
Dirichlet 0.5, the `edge-int8` chip) once per precision and seed; the final accuracy of each run,
the mean and spread over seeds, the change against float, and the chip's energy per round (sum over
the clients' local training, as the chip accounts it: fp32 engines for float, whose report says
that the preset specifies int8). Speed: one local training step (forward, backward, the roundings,
Adam) of the same csnn at batch 32, T = 4, one thread, the precisions alternated in timed rounds;
samples/s and the ratio to float. Target (issue 20): int8 within 1 point of float.

    python bench/train_precision.py [--rounds 10] [--seeds 0,1,2] [--precisions float,fp16,int8]
                                    [--run-config "..."] [--out runs/bench-precision] [--json F]
                                    [--speed-only] [--no-speed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import alternate, print_table, spikefed_run, warn_if_busy  # noqa: E402


def step_speed(precisions: list[str], rounds: int, seconds: float) -> dict[str, list[float]]:
    """Training steps per second of each precision (csnn, mnist-subset batch 32, T = 4)."""
    import torch
    import torch.nn.functional as F

    from shared.config import RunConfig
    from shared.data import load_dataset
    from shared.quant.integer_training import TrainPrecision
    from shared.rebuild import build_from_spec

    torch.set_num_threads(1)
    spec = RunConfig.parse({}).model_spec()
    x_all, y_all = load_dataset("mnist-subset", "train").tensors
    batches = [(x_all[i : i + 32], y_all[i : i + 32]) for i in range(0, 32 * 16, 32)]
    steps = {}
    for precision in precisions:
        torch.manual_seed(0)
        model = build_from_spec(spec).train()
        opt = torch.optim.Adam(model.parameters(), lr=0.002)
        rounding = TrainPrecision(precision, model, seed=0).attach()

        def step(i: int, model=model, opt=opt, rounding=rounding) -> None:
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rounding.after_backward()
            opt.step()
            rounding.after_step()

        steps[precision] = step
    rates, others = alternate(steps, rounds, seconds, warmup=2.0)
    warn_if_busy(others)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--precisions", default="float,fp16,int8", help="float first")
    parser.add_argument("--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--out", default=None,
                        help="keep the runs here and reuse finished ones (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--speed-seconds", type=float, default=6.0)
    parser.add_argument("--speed-only", action="store_true", help="skip the federations")
    parser.add_argument("--no-speed", action="store_true", help="skip the step timing")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-precision-"))
    results: dict[str, dict] = {p: {"accuracy": {}, "energy_j_per_round": {}} for p in precisions}
    if not args.speed_only:
        for seed in seeds:
            for precision in precisions:
                config = f"train-precision={precision} seed={seed} {args.run_config}"
                summary = spikefed_run(
                    str(out / f"{precision}-seed{seed}"), "--clients", str(args.clients),
                    "--rounds", str(args.rounds), "--run-config", config, "--no-evaluate",
                    "--metrics-port", "0", reuse=args.out is not None)
                history = summary["history"]
                energy = statistics.mean(e["energy_j"] for e in history)
                results[precision]["accuracy"][seed] = summary["final_accuracy"]
                results[precision]["energy_j_per_round"][seed] = energy
                print(f"{precision} seed {seed}: accuracy {summary['final_accuracy']:.4f}, "
                      f"chip energy {energy:.4g} J/round", flush=True)
    if not args.no_speed:
        rates = step_speed(precisions, args.speed_rounds, args.speed_seconds)
        for precision in precisions:
            results[precision]["steps_per_s"] = rates[precision]
    ref = results[precisions[0]]
    rows = []
    for precision, r in results.items():
        row = [precision]
        if not args.speed_only:
            acc = [r["accuracy"][s] for s in seeds]
            delta = [r["accuracy"][s] - ref["accuracy"][s] for s in seeds]
            row += [
                " ".join(f"{100 * a:.1f}" for a in acc),
                f"{100 * statistics.mean(acc):.2f} ± {100 * statistics.pstdev(acc):.2f}",
                f"{100 * statistics.mean(delta):+.2f}",
                f"{statistics.mean(r['energy_j_per_round'].values()):.4g}",
                f"{statistics.mean(r['energy_j_per_round'].values()) / statistics.mean(ref['energy_j_per_round'].values()):.3f}",  # noqa: E501
            ]
        if not args.no_speed:
            speed = statistics.median(r["steps_per_s"]) * 32
            row += [f"{speed:.0f}",
                    f"{speed / (statistics.median(ref['steps_per_s']) * 32):.2f}"]
        rows.append(row)
    header = ["train-precision"]
    if not args.speed_only:
        header += [f"final acc % (seeds {args.seeds})", "mean ± sd", f"Δ vs {precisions[0]}",
                   "chip J / round", f"energy vs {precisions[0]}"]
    if not args.no_speed:
        header += ["step samples/s", f"speed vs {precisions[0]}"]
    title = "train-precision: one csnn training step (batch 32, T = 4, 1 thread)"
    if not args.speed_only:
        title = (f"train-precision: default federation, {args.clients} clients, {args.rounds} "
                 f"rounds {args.run_config}".strip())
    print_table(title, header, rows, width=150)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
