"""Cost of the neuromorphic chip accounting on the client's real training step.

The client's default step (the run config's model: csnn, T=4, 4-bit QAT weights; batch 32 of
mnist-subset; Adam; cross-entropy) runs on two identical copies of the model, alternating in timed
rounds: one plain, one with `shared.neurocore`'s accountant attached (module hooks counting every
layer's exact FP/BP/WG ops from the step's own tensors, then the cost model on the `edge-int8`
preset, as `client.train.train_local` does). Target: accounted / plain step time <= 1.15.

    python bench/neurocore_overhead.py [--rounds 5] [--seconds 2] [--threads 2] [--weight-bits 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import alternate, print_table, warn_if_busy  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.data import load_dataset  # noqa: E402
from shared.neurocore import ChipConfig, NeuroCore  # noqa: E402
from shared.neurocore.cost import StepPlan  # noqa: E402
from shared.rebuild import build_from_spec  # noqa: E402
from shared.snn import model_layout  # noqa: E402

TARGET = 1.15


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="csnn")
    parser.add_argument("--weight-bits", type=int, default=None, help="default: the run config's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run config's")
    parser.add_argument("--chip", default=None, help="default: the run config's chip preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"model": args.model}
    for key, value in (("weight-bits", args.weight_bits), ("batch-size", args.batch_size),
                       ("chip", args.chip)):
        if value is not None:
            overrides[key] = value
    config = RunConfig.parse(overrides)
    torch.manual_seed(0)
    plain_model = build_from_spec(config.model_spec())
    accounted_model = copy.deepcopy(plain_model)
    chip = ChipConfig.preset(config.chip if config.chip != "none" else "edge-int8",
                             optimizer=config.optimizer)
    x_all, y_all = load_dataset(config.dataset, "train").tensors
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        idx = torch.randint(0, len(y_all), (config.batch_size,), generator=gen)
        x = x_all[idx]
        batches.append((model_layout(x), y_all[idx]))

    def trainer(model: torch.nn.Module, accountant=None):
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        model.train()

        def step(i: int) -> None:  # the body of client.train.train_local's loop
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if accountant is not None:
                accountant.step()

        return step

    accountant = NeuroCore(chip).accountant(accounted_model)
    print(f"torch {torch.__version__} | threads {args.threads} | {config.model} "
          f"T={config.time_steps} batch {config.batch_size} | weight bits {config.weight_bits} | "
          f"chip {chip.precision} x{chip.cores} cores")
    with accountant:
        rates, others = alternate(
            {"plain": trainer(plain_model), "accounted": trainer(accounted_model, accountant)},
            args.rounds, args.seconds, args.warmup,
        )
        trainer(accounted_model)(0)  # one more step, to time the cost model alone
        step_counts = accountant.tracer.end_step()
    plan = StepPlan(step_counts, chip, energy_scale=accountant.energy_scale)  # cached per shape
    start = time.perf_counter()
    for _ in range(20):
        cost = plan.cost(step_counts)
    cost_ms = (time.perf_counter() - start) / 20 * 1e3
    plain, accounted = (statistics.median(rates[k]) for k in ("plain", "accounted"))
    ratio = plain / accounted  # step-time ratio
    per_round = statistics.median(p / a for p, a in zip(rates["plain"], rates["accounted"],
                                                         strict=True))
    print_table("training step (median over rounds)", ["step", "steps/s", "ms/step", "vs plain"],
                [["plain", f"{plain:.2f}", f"{1e3 / plain:.1f}", "1.00x"],
                 ["accounted", f"{accounted:.2f}", f"{1e3 / accounted:.1f}", f"{ratio:.3f}x"]])
    print(f"cost model alone (cached plan): {cost_ms:.2f} ms/step; one step on the chip: "
          f"{cost.energy_j * 1e3:.3f} mJ, {cost.cycles:,} cycles, {cost.dram_bytes / 1e6:.2f} MB")
    print(f"accounting overhead ratio {ratio:.3f} (median of per-round ratios {per_round:.3f}); "
          f"target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")
    warn_if_busy(others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
