"""Robust aggregation: final accuracy of each strategy under each kind of byzantine client.

One `spikefed-run` per (strategy, attack): the same federation (seed, data, partitions) with
`--byzantine K --byzantine-kind ATTACK` (attack "none" = clean). Prints final accuracy (%) per
strategy x attack, each attack's change against the same strategy's clean run, the updates the
server rejected, and the gap to clean FedAvg. Targets (issue 9): a NaN client is rejected every
round and costs <= 3 points; one sign-flip client of 5 costs median / Krum <= 3 points while
FedAvg visibly degrades.

    python bench/robustness.py [--clients 5] [--byzantine 1] [--rounds 5] [--local-epochs 1]
        [--strategies fedavg,fedmedian,krum] [--attacks none,nan,sign-flip,scale,random]
        [--run-config "partitioning=iid"] [--out DIR] [--json FILE]
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
    parser.add_argument("--byzantine", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--strategies", default="fedavg,fedmedian,krum")
    parser.add_argument("--attacks", default="none,nan,sign-flip,scale,random")
    parser.add_argument("--run-config", default="partitioning=iid",
                        help="extra run-config overrides")
    parser.add_argument("--out", default=None,
                        help="keep the runs here and reuse finished ones (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    strategies, attacks = args.strategies.split(","), args.attacks.split(",")
    if "none" not in attacks:
        attacks.insert(0, "none")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-robustness-"))
    results: dict[str, dict[str, dict]] = {}
    for strategy in strategies:
        results[strategy] = {}
        for attack in attacks:
            config = f"strategy={strategy} local-epochs={args.local_epochs} {args.run_config}"
            extra = [] if attack == "none" else ["--byzantine", str(args.byzantine),
                                                 "--byzantine-kind", attack]
            summary = spikefed_run(str(out / f"{strategy}-{attack}"), "--clients",
                                   str(args.clients), "--rounds", str(args.rounds),
                                   "--run-config", config, *extra,
                                   reuse=args.out is not None)
            results[strategy][attack] = {
                "final_accuracy": summary["final_accuracy"],
                "rejected_updates": summary["rejected_updates"],
            }
            print(f"{strategy:>14} {attack:>10}: {results[strategy][attack]}", flush=True)
    clean_fedavg = results.get("fedavg", {}).get("none")
    rows = []
    for strategy, row in results.items():
        clean = row["none"]["final_accuracy"]
        cells = [f"{100 * clean:.2f}"]
        for attack in attacks[1:]:
            acc, rejected = row[attack]["final_accuracy"], row[attack]["rejected_updates"]
            cell = f"{100 * acc:.2f} ({100 * (acc - clean):+.1f})"
            cells.append(cell + (f" [{rejected} rej]" if rejected else ""))
        gap = ""
        if clean_fedavg is not None:
            gap = f"{100 * (clean - clean_fedavg['final_accuracy']):+.1f}"
        rows.append([strategy, *cells, gap])
    print_table(
        f"final accuracy %, {args.byzantine} byzantine of {args.clients} clients, "
        f"{args.rounds} rounds, local-epochs {args.local_epochs} {args.run_config}; "
        "(change vs the strategy's clean run) [rejected updates]",
        ["strategy", "clean", *attacks[1:], "clean vs fedavg"],
        rows,
        width=150,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
