"""Update compression: upstream bytes and final accuracy of the same federation at update-bits
32 (float32 weights, no compression), 8 and 4.

Each setting is one `spikefed-run` (real Flower simulation, same seed, data and partitions);
bytes are what the clients' train replies carried (`bytes_up`: packed codes + scales, or float32
weights), summed over the run. Besides the final accuracy's change, the mean change of the
per-round accuracy is printed: one test set of 1,000 images moves the final figure by 0.1 point
per image, so the per-round mean is the steadier comparison. Targets (issue 9): 8 bits <= 0.30x
the upstream bytes of 32 and <= 0.5 point less final accuracy; 4 bits reported.

    python bench/federation.py [--clients 5] [--rounds 5] [--local-epochs 2] [--bits 32,8,4]
                               [--run-config "..."] [--out runs/bench-federation] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, spikefed_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--bits", default="32,8,4", help="update-bits settings, 32 first")
    parser.add_argument("--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--out", default=None,
                        help="keep the runs here and reuse finished ones (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-federation-"))
    results = {}
    for bits in bits_list:
        config = f"update-bits={bits} local-epochs={args.local_epochs} {args.run_config}"
        summary = spikefed_run(str(out / f"bits-{bits}"), "--clients", str(args.clients),
                               "--rounds", str(args.rounds), "--run-config", config,
                               reuse=args.out is not None)
        results[bits] = {
            "bytes_up": sum(e["bytes_up"] for e in summary["history"]),
            "bytes_down": sum(e["bytes_down"] for e in summary["history"]),
            "final_accuracy": summary["final_accuracy"],
            "accuracy_per_round": [e["accuracy"] for e in summary["history"]],
            "rejected_updates": summary["rejected_updates"],
        }
        print(f"update-bits={bits}: {results[bits]}", flush=True)
    ref = results[bits_list[0]]
    rows = []
    for bits, r in results.items():
        pairs = zip(r["accuracy_per_round"], ref["accuracy_per_round"], strict=True)
        mean_change = sum(a - b for a, b in pairs) / len(ref["accuracy_per_round"])
        rows.append([
            str(bits),
            f"{r['bytes_up'] / args.rounds / 1e3:.1f}",
            f"{r['bytes_up'] / ref['bytes_up']:.3f}",
            f"{r['bytes_down'] / args.rounds / 1e3:.1f}",
            f"{100 * r['final_accuracy']:.2f}",
            f"{100 * (r['final_accuracy'] - ref['final_accuracy']):+.2f}",
            f"{100 * mean_change:+.2f}",
        ])
    print_table(
        f"update compression: {args.clients} clients, {args.rounds} rounds, "
        f"local-epochs {args.local_epochs} {args.run_config}".strip(),
        ["update-bits", "kB up / round", f"up vs {bits_list[0]}", "kB down / round",
         "final acc %", "Δ final (points)", "Δ mean over rounds (points)"],
        rows,
        width=130,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
