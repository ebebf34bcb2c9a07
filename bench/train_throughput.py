"""Training throughput of one csnn step: spikefed vs snnTorch vs SpikingJelly (CPU).

The same network in three implementations:

    conv3x3(1->16)-BN-LIF-avgpool2, conv3x3(16->32)-BN-LIF-avgpool2, linear(32*7*7 -> 10)

LIF with decay 0.5, threshold 1, reset by subtraction, atan surrogate (alpha 2); direct-coded
[B, 1, 28, 28] inputs in [0, 1], T time steps, the readout is the linear layer's output averaged
over T, cross-entropy loss, SGD with momentum 0.9. One "step" = forward + backward + optimizer step
(+ the library's state reset where it needs one).

- spikefed:     `shared.snn.build_model("csnn", ...)` (multi-step, fused neuron time loop).
- snnTorch:     the idiomatic snnTorch loop: `snn.Leaky` neurons, `reset_mem()`, then
                `for step in range(T)` runs every layer (conv1 included) on `[B, ...]`.
- SpikingJelly: multi-step mode (`step_mode="m"`) layer wrappers and `neuron.LIFNode`, input
                repeated to `[T, B, 1, 28, 28]`, `functional.reset_net` after each step.

They start from the same weights (convs without bias, as ours: BN follows them). Known
differences, none of which changes the amount of work: snnTorch's `Leaky` subtracts the threshold
after the decay (mem = beta * mem + x - thr * s_prev, where spikefed and SpikingJelly compute
h = beta * (h - thr * s_prev) + x), fires on `>` rather than `>=`, and its BatchNorm sees one time
step at a time; spikefed computes conv1-BN1 once (the direct-coded input is the same at every
step), the other two compute it T times, as those libraries are normally used.

The implementations run alternately in repeated timed rounds (after a warm-up) so that machine
noise hits all of them alike; the reported figure is the median samples/s over the rounds, and the
ratios are given both as ratios of medians and as medians of the per-round ratios. The CPU load of
other processes during the timed runs is measured (Linux) and a warning printed when it was not
negligible: on a small shared machine that is the main source of error.

Needs the `bench` extra (`make bench`). Usage:

    python bench/train_throughput.py [--time-steps 4] [--batch-size 64] [--rounds 5]
                                     [--seconds 2] [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/train_throughput.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import alternate, print_table  # noqa: E402
from shared.snn import build_model  # noqa: E402

# spikingjelly's import probes for Triton and logs a warning when it is absent (CPU-only torch).
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

try:
    import snntorch as snn
    from snntorch import surrogate as snn_surrogate
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import layer as sj_layer
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate
except ImportError as exc:  # pragma: no cover - depends on the environment
    print(
        f"error: this benchmark needs snntorch and spikingjelly ({exc}).\n"
        "Install the `bench` extra and run it with:  make bench",
        file=sys.stderr,
    )
    sys.exit(2)

IN_CHANNELS, INPUT_SIZE, NUM_CLASSES = 1, 28, 10
DECAY, THRESHOLD, ATAN_ALPHA = 0.5, 1.0, 2.0


# --------------------------------------------------------------------------- the three networks


def spikefed_csnn(time_steps: int) -> nn.Module:
    return build_model(
        "csnn",
        in_channels=IN_CHANNELS,
        num_classes=NUM_CLASSES,
        input_size=INPUT_SIZE,
        time_steps=time_steps,
        neuron="lif",
        surrogate="atan",
    )


class SnnTorchCSNN(nn.Module):
    """The csnn written the usual snnTorch way: one Python loop over time, every layer per step."""

    def __init__(self, time_steps: int) -> None:
        super().__init__()
        self.time_steps = time_steps
        spike_grad = snn_surrogate.atan(alpha=ATAN_ALPHA)
        self.conv1 = nn.Conv2d(IN_CHANNELS, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.lif1 = snn.Leaky(
            beta=DECAY, threshold=THRESHOLD, spike_grad=spike_grad, reset_mechanism="subtract"
        )
        self.pool1 = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.lif2 = snn.Leaky(
            beta=DECAY, threshold=THRESHOLD, spike_grad=spike_grad, reset_mechanism="subtract"
        )
        self.pool2 = nn.AvgPool2d(2)
        self.fc = nn.Linear(32 * (INPUT_SIZE // 4) ** 2, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        mem1 = self.lif1.reset_mem()  # snnTorch 1.0 name of init_leaky()
        mem2 = self.lif2.reset_mem()
        out = []
        for _ in range(self.time_steps):
            spk1, mem1 = self.lif1(self.bn1(self.conv1(x)), mem1)
            spk2, mem2 = self.lif2(self.bn2(self.conv2(self.pool1(spk1))), mem2)
            out.append(self.fc(self.pool2(spk2).flatten(1)))
        return torch.stack(out).mean(0)


class SpikingJellyCSNN(nn.Module):
    """The csnn in SpikingJelly's multi-step mode: `[T, B, ...]` through step_mode="m" layers."""

    def __init__(self, time_steps: int) -> None:
        super().__init__()
        self.time_steps = time_steps

        def lif() -> nn.Module:
            # h = v - v / tau + x = 0.5 v + x (decay_input=False, tau=2); v_reset=None: soft reset.
            # SpikingJelly 2.0 picks the CPU/CUDA kernel itself (there is no `backend=` argument).
            return sj_neuron.LIFNode(
                tau=1.0 / (1.0 - DECAY),
                decay_input=False,
                v_threshold=THRESHOLD,
                v_reset=None,
                surrogate_function=sj_surrogate.ATan(alpha=ATAN_ALPHA),
                detach_reset=True,
                step_mode="m",
            )

        m = "m"
        self.net = nn.Sequential(
            sj_layer.Conv2d(IN_CHANNELS, 16, 3, padding=1, bias=False, step_mode=m),
            sj_layer.BatchNorm2d(16, step_mode=m),
            lif(),
            sj_layer.AvgPool2d(2, step_mode=m),
            sj_layer.Conv2d(16, 32, 3, padding=1, bias=False, step_mode=m),
            sj_layer.BatchNorm2d(32, step_mode=m),
            lif(),
            sj_layer.AvgPool2d(2, step_mode=m),
            sj_layer.Flatten(step_mode=m),
            sj_layer.Linear(32 * (INPUT_SIZE // 4) ** 2, NUM_CLASSES, step_mode=m),
        )

    def forward(self, x: Tensor) -> Tensor:
        x_seq = x.unsqueeze(0).repeat(self.time_steps, 1, 1, 1, 1)  # [T, B, C, H, W]
        return self.net(x_seq).mean(0)


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the conv/BN/linear weights (and BN running stats) of `src`, layer by layer."""
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)  # the libraries' layers subclass these
    src_layers = [m for m in src.modules() if isinstance(m, kinds)]
    dst_layers = [m for m in dst.modules() if isinstance(m, kinds)]
    if len(src_layers) != len(dst_layers):
        raise RuntimeError(f"layer mismatch: {len(src_layers)} vs {len(dst_layers)}")
    for s, d in zip(src_layers, dst_layers, strict=True):
        d.load_state_dict(s.state_dict())


# --------------------------------------------------------------------------- the training step


@dataclass
class Impl:
    name: str
    model: nn.Module
    after_step: Callable[[nn.Module], None] | None = None
    optimizer: torch.optim.Optimizer = field(init=False)
    lr: float = 0.05

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.model)
        return loss.item()


def make_impls(time_steps: int, lr: float, seed: int) -> list[Impl]:
    torch.manual_seed(seed)
    ours = spikefed_csnn(time_steps)
    st = SnnTorchCSNN(time_steps)
    sj = SpikingJellyCSNN(time_steps)
    copy_weights(ours, st)
    copy_weights(ours, sj)
    for model in (ours, st, sj):
        model.train()
    return [
        Impl("spikefed", ours, lr=lr),
        Impl("snnTorch", st, lr=lr),
        Impl("SpikingJelly", sj, after_step=sj_functional.reset_net, lr=lr),
    ]


def make_batches(n: int, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch_size, IN_CHANNELS, INPUT_SIZE, INPUT_SIZE, generator=g),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


def learning_check(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Fresh copies of the three nets, trained on one fixed batch: the loss must start near
    ln(10) = 2.30 and fall."""
    impls = make_impls(args.time_steps, args.lr, args.seed)
    ((x, y),) = make_batches(1, args.batch_size, args.seed + 1)
    result = {}
    for impl in impls:
        losses = [impl.step(x, y) for _ in range(args.check_steps)]
        result[impl.name] = {
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "min_loss": min(losses),
        }
    return result


def benchmark(args: argparse.Namespace) -> tuple[dict[str, list[float]], list[float]]:
    """Samples/s of every implementation in every round, and the other processes' CPU load
    (cores) measured during each timed run."""
    impls = make_impls(args.time_steps, args.lr, args.seed)
    batches = make_batches(8, args.batch_size, args.seed + 2)
    steps = {impl.name: (lambda i, impl=impl: impl.step(*batches[i % len(batches)]))
             for impl in impls}
    rates, others = alternate(steps, args.rounds, args.seconds, args.warmup)
    return {k: [r * args.batch_size for r in v] for k, v in rates.items()}, others


# --------------------------------------------------------------------------- output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--time-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed round")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per implementation")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument(
        "--check-steps",
        type=int,
        default=20,
        help="steps of the fixed-batch learning check (0: skip it)",
    )
    p.add_argument(
        "--check",
        action="store_const",
        const=50,
        dest="check_steps",
        help="the full learning check: 50 steps",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the results as JSON to FILE",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t, b = args.time_steps, args.batch_size
    sj_version = importlib.metadata.version("spikingjelly")
    print(
        f"torch {torch.__version__} | snntorch {snn.__version__} | spikingjelly {sj_version} | "
        f"python {platform.python_version()}"
    )
    print(
        f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}) | "
        f"device cpu"
    )
    print(
        f"workload: csnn train step, input [{b}, {IN_CHANNELS}, {INPUT_SIZE}, {INPUT_SIZE}] "
        f"direct-coded, T={t}, LIF decay {DECAY} soft reset, atan(alpha={ATAN_ALPHA}), "
        f"CE on mean-over-T logits, SGD lr {args.lr} momentum 0.9"
    )
    print(
        f"timing: {args.warmup:g} s warm-up each, then {args.rounds} rounds x "
        f"{args.seconds:g} s per implementation, alternating"
    )

    results: dict = {
        "torch": torch.__version__,
        "snntorch": snn.__version__,
        "spikingjelly": sj_version,
        "threads": torch.get_num_threads(),
        "workload": {
            "model": "csnn",
            "time_steps": t,
            "batch_size": b,
            "input": [b, IN_CHANNELS, INPUT_SIZE, INPUT_SIZE],
            "lr": args.lr,
        },
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
    }

    if args.check_steps > 0:
        check = learning_check(args)
        rows = [
            [
                name,
                f"{c['first_loss']:.3f}",
                f"{c['last_loss']:.3f}",
                "yes" if c["last_loss"] < 0.7 * c["first_loss"] else "NO",
            ]
            for name, c in check.items()
        ]
        print_table(
            f"learning check: {args.check_steps} steps on one fixed batch",
            ["implementation", "first loss", "last loss", "learns"],
            rows,
        )
        results["check"] = check

    rates, others = benchmark(args)
    med = {name: statistics.median(r) for name, r in rates.items()}
    ratios = {f"spikefed/{o}": med["spikefed"] / med[o] for o in ("snnTorch", "SpikingJelly")}
    # The implementations of one round run back to back, so the ratio within a round cancels
    # most slow drifts of the machine; its median is the more robust comparison.
    paired = {
        f"spikefed/{o}": statistics.median(
            a / b for a, b in zip(rates["spikefed"], rates[o], strict=True)
        )
        for o in ("snnTorch", "SpikingJelly")
    }
    rows = [
        [
            name,
            f"{med[name]:.0f}",
            f"{min(r):.0f}-{max(r):.0f}",
            f"{1000 * b / med[name]:.1f}",
            f"{med['spikefed'] / med[name]:.2f}x",
        ]
        for name, r in rates.items()
    ]
    print_table(
        f"training throughput (median of {args.rounds} rounds)",
        ["implementation", "samples/s", "range", "ms/step", "spikefed is"],
        rows,
    )
    for name, ratio in ratios.items():
        print(
            f"{name}: {ratio:.2f} (ratio of medians), {paired[name]:.2f} (median of per-round "
            f"ratios)"
        )

    if others:
        print(
            "other processes' CPU load during the timed runs: median "
            f"{statistics.median(others):.2f}, max {max(others):.2f} cores (of {os.cpu_count()})"
        )
        if max(others) > 0.25:
            print(
                "warning: the machine was not idle while timing; the rounds with load are slower "
                "and the numbers are noisy. Rerun on a quiet machine (the ratios of one round, "
                "run back to back, are the most robust figure)."
            )
        results["other_cpu_load_cores"] = others
    results["samples_per_s"] = med
    results["samples_per_s_rounds"] = rates
    results["ratios"] = ratios
    results["ratios_paired"] = paired
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
