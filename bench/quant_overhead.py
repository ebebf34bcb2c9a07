"""Cost of integer quantization: fake-quant (QAT) training vs float training, and inference.

Training: one csnn step (T=4, batch 64, atan, Adam, cross-entropy) of the float model and of its
4-bit quantization-aware twin (`shared.quant.quantize`), alternating in timed rounds; target
QAT / float step time <= 1.25.

Inference (eval mode, batch 256): the float model, the QAT model's eval path (integer arithmetic
on float32 tensors) and the exported int32 engine (`to_integer`), in images/s.

    python bench/quant_overhead.py [--rounds 5] [--seconds 2] [--bits 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import alternate, print_table, warn_if_busy  # noqa: E402
from shared.quant import quantize, to_integer  # noqa: E402
from shared.snn import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    float_model = build_model("csnn", in_channels=1, num_classes=10, input_size=28,
                              time_steps=args.time_steps)
    qat_model = quantize(float_model, args.bits)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch_size, 1, 28, 28, generator=gen),
                torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(8)]

    def trainer(model: torch.nn.Module):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()

        def step(i: int) -> None:
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    print(f"torch {torch.__version__} | threads {args.threads} | csnn T={args.time_steps} "
          f"batch {args.batch_size} | {args.bits}-bit weights")
    rates, others = alternate({"float": trainer(float_model), "qat": trainer(qat_model)},
                              args.rounds, args.seconds, args.warmup)
    train = {k: statistics.median(v) * args.batch_size for k, v in rates.items()}
    ratio = train["float"] / train["qat"]
    print_table("training step (median over rounds)", ["model", "samples/s", "step time vs float"],
                [["float", f"{train['float']:.0f}", "1.00x"],
                 [f"QAT {args.bits}-bit", f"{train['qat']:.0f}", f"{ratio:.2f}x"]])
    print(f"fake-quant training step costs {ratio:.2f}x the float step (target <= 1.25x)")

    images = (torch.rand(256, 1, 28, 28, generator=gen) * 255).round().to(torch.uint8)
    as_float = images.float() / 255
    float_model.eval()
    qat_model.eval()
    engine = to_integer(qat_model)
    with torch.no_grad():
        infer = {
            "float eval": lambda i: float_model(as_float),
            "QAT eval (integer on float32)": lambda i: qat_model(as_float),
            "int32 engine": lambda i: engine(images),
        }
        rates, more = alternate(infer, max(1, args.rounds // 2), args.seconds, args.warmup)
    others += more
    base = statistics.median(rates["float eval"]) * len(images)
    print_table("inference, batch 256 (median over rounds)", ["path", "images/s", "vs float"],
                [[k, f"{statistics.median(v) * len(images):.0f}",
                  f"{statistics.median(v) * len(images) / base:.2f}x"] for k, v in rates.items()])
    warn_if_busy(others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
