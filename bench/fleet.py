"""Client selection on a heterogeneous fleet: Flower's uniform sampling vs deadline- and
energy-aware selection (`selection=aware`, `shared.fleet`), same fleet, data, seed and rounds.

Each setting is one `spikefed-run --fleet FLEET` (a real Flower simulation, one client per device).
The figures are the fleet's *simulated* seconds and joules (chip model + link + radio), not this
machine's time: simulated seconds and joules until the global model first reaches 90 % and 95 %
test accuracy (summary.json's time_to_accuracy / energy_to_accuracy), the replies dropped as
stragglers (later than round-deadline-s) and out of energy, and fairness: the share of the fleet's
devices whose update was ever aggregated. With several seeds every figure is reported per seed and
the table shows the medians.

The default configuration is cheap enough for a 2-core machine (a few minutes): digits, the mlp
SNN at T = 4, 5 local epochs, lr 0.01, 10 of 60 devices a round (fraction-train 0.17), no federated
evaluation, a 1.5 s deadline.

    python bench/fleet.py [--fleet deploy/fleets/edge-mix.toml] [--rounds 30] [--seeds 0]
                          [--deadline 1.5] [--run-config "..."] [--out DIR] [--json FILE]
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

from bench.common import print_table, spikefed_run  # noqa: E402

BASE = ("dataset=digits model=mlp time-steps=4 local-epochs=5 lr=0.01 fraction-train=0.17 "
        "fraction-evaluate=0.0")
POLICIES = ("uniform", "aware")
TARGETS = ("0.9", "0.95")


def figures(summary: dict) -> dict:
    history = summary["history"]
    return {
        "time_to_accuracy": summary["time_to_accuracy"],
        "energy_to_accuracy": summary["energy_to_accuracy"],
        "rounds_to_accuracy": {t: next((e["round"] for e in history
                                        if e["accuracy"] >= float(t)), None) for t in TARGETS},
        "stragglers": sum(e["stragglers"] for e in history),
        "out_of_energy": sum(e["out_of_energy"] for e in history),
        "selected": sum(e["selected"] for e in history),
        "aggregated": sum(e["clients"] for e in history),
        "contributed_share": summary["fleet"]["contributed_share"],
        "sim_seconds": sum(e["sim_seconds"] or 0.0 for e in history),
        "sim_energy_j": sum(e["sim_energy_j"] or 0.0 for e in history),
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "classes": summary["fleet"]["classes"],
    }


def _median(values: list[float | None]) -> float | None:
    """The median, None when any seed never reached the target (it is then not a time)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.median(values)  # type: ignore[type-var]


def _fmt(value: float | None, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fleet", default=str(ROOT / "deploy" / "fleets" / "edge-mix.toml"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--deadline", type=float, default=1.5, help="round-deadline-s")
    parser.add_argument("--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--out", default=None,
                        help="keep the runs here and reuse finished ones (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-fleet-"))
    results: dict[str, dict[int, dict]] = {p: {} for p in POLICIES}
    for seed in seeds:
        for policy in POLICIES:
            config = (f"{BASE} round-deadline-s={args.deadline:g} selection={policy} seed={seed} "
                      f"{args.run_config}")
            summary = spikefed_run(str(out / f"{policy}-seed{seed}"), "--fleet", args.fleet,
                                   "--rounds", str(args.rounds), "--no-evaluate",
                                   "--metrics-port", "0", "--run-config", config,
                                   reuse=args.out is not None)
            result = results[policy][seed] = figures(summary)
            print(f"{policy} seed {seed}: " + json.dumps(
                {k: v for k, v in result.items() if k != "classes"}), flush=True)
    rows = []
    for policy in POLICIES:
        per_seed = list(results[policy].values())
        row = [policy]
        for t in TARGETS:
            row.append(_fmt(_median([r["rounds_to_accuracy"][t] for r in per_seed]), "g"))
            row.append(_fmt(_median([r["time_to_accuracy"][t] for r in per_seed]), ".1f"))
            row.append(_fmt(_median([r["energy_to_accuracy"][t] for r in per_seed]), ".1f"))
        row += [
            f"{statistics.median(r['stragglers'] for r in per_seed):g}",
            f"{statistics.median(r['out_of_energy'] for r in per_seed):g}",
            f"{statistics.median(r['aggregated'] / max(1, r['selected']) for r in per_seed):.0%}",
            f"{statistics.median(r['contributed_share'] for r in per_seed):.0%}",
            f"{100 * statistics.median(r['final_accuracy'] for r in per_seed):.1f}",
        ]
        rows.append(row)
    print_table(
        f"fleet {Path(args.fleet).name}: {args.rounds} rounds, deadline {args.deadline:g} s, "
        f"seeds {args.seeds}; {BASE} {args.run_config}".strip(),
        ["selection", "rounds→90%", "sim s→90%", "J→90%", "rounds→95%", "sim s→95%", "J→95%",
         "stragglers", "out of energy", "aggregated/selected", "devices contributed",
         "final acc %"],
        rows,
        width=170,
    )
    for t in TARGETS:
        uniform = _median([r["time_to_accuracy"][t] for r in results["uniform"].values()])
        aware = _median([r["time_to_accuracy"][t] for r in results["aware"].values()])
        e_uniform = _median([r["energy_to_accuracy"][t] for r in results["uniform"].values()])
        e_aware = _median([r["energy_to_accuracy"][t] for r in results["aware"].values()])
        if None not in (uniform, aware, e_uniform, e_aware) and aware and e_aware:
            print(f"to {float(t):.0%}: aware / uniform = {aware / uniform:.2f}x simulated "
                  f"seconds, {e_aware / e_uniform:.2f}x joules")
        else:
            print(f"to {float(t):.0%}: not reached by every run; no ratio")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"seeds": seeds, "rounds": args.rounds, "deadline_s": args.deadline,
             "run_config": f"{BASE} {args.run_config}".strip(), "results": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
