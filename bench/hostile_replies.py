"""Hostile replies: no reply may crash the server or take over the global model (issue 15).

Two parts, both printed as tables:

1. Fuzzing (the long profile of tests/server/test_reply_fuzz.py): `--examples` cases, each one
   train round and one evaluate round of a strategy (fedavg, fedprox, fedadam, fedmedian,
   fedtrimmedavg, krum, multikrum, bulyan, DP-wrapped fedavg; update-bits 32 and 8, in turn) with 7
   honest replies and 1-2 hostile ones (`client.hostile.mutate`, seeded), against the honest-only
   rounds. Prints cases tried, hostile replies rejected / accepted as harmless, crashes (an
   exception out of a hook) and property violations.
2. A real federation (`flwr.simulation.run_simulation`, each run in its own process): the same
   run clean (`client.app:app`) and attacked (`client.hostile.hostile_app(K)`: nodes with
   partition-id < K send `client.hostile.SHAPES` / `EVALUATE_SHAPES` in turn). Prints rounds
   completed, rejections by reason and final accuracy clean vs attacked.

    python bench/hostile_replies.py [--examples 10000] [--seed 0]
        [--clients 5] [--hostile 2] [--rounds 5] [--skip-fuzz] [--skip-federation]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table  # noqa: E402

FEDERATION = {"dataset": "digits", "model": "mlp", "local-epochs": 1, "chip": "none",
              "min-nodes": 2, "metrics-port": 0, "time-steps": 4}


def load_fuzzer():
    """tests/server/test_reply_fuzz.py as a module (its `fuzz_case` is the harness)."""
    sys.path.append(str(ROOT / "tests"))  # its `support` builders
    path = ROOT / "tests" / "server" / "test_reply_fuzz.py"
    spec = importlib.util.spec_from_file_location("test_reply_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.identify_task()
    return module


def fuzz(examples: int, seed: int) -> dict:
    import gc

    fuzzer = load_fuzzer()
    logging.disable(logging.CRITICAL)  # one warning per rejection: 10,000s of lines
    gc.collect = lambda *args: 0  # Flower's Bulyan collects per array record; not under test
    rng = random.Random(seed)
    combos = [(name, bits) for name in fuzzer.STRATEGIES for bits in (32, 8)]
    totals = Counter()
    per_strategy: dict[str, Counter] = {name: Counter() for name in fuzzer.STRATEGIES}
    examples_failed: list[str] = []
    started = time.perf_counter()
    for i in range(examples):
        name, bits = combos[i % len(combos)]
        counts = per_strategy[name]
        counts["cases"] += 1
        try:
            case = fuzzer.fuzz_case(name, bits, rng.choice)
        except Exception:
            counts["crashes"] += 1
            examples_failed.append(f"case {i} {name}/{bits}: {traceback.format_exc(limit=3)}")
            continue
        hostile = 2 * case.hostile  # each hostile node sends one train and one evaluate reply
        counts["hostile"] += hostile
        counts["rejected"] += case.rejected
        counts["harmless"] += hostile - case.rejected
        if case.problems:
            counts["violations"] += 1
            examples_failed.append(f"case {i} {name}/{bits}: {case.changes} {case.problems}")
    logging.disable(logging.NOTSET)
    for counts in per_strategy.values():
        totals.update(counts)
    rows = [[name, c["cases"], c["hostile"], c["rejected"], c["harmless"], c["crashes"],
             c["violations"]] for name, c in per_strategy.items()]
    rows.append(["all", totals["cases"], totals["hostile"], totals["rejected"],
                 totals["harmless"], totals["crashes"], totals["violations"]])
    title = (f"Fuzzed replies ({examples} cases, seed {seed}, "
             f"{time.perf_counter() - started:.0f} s; update-bits 32 and 8 in turn)")
    print_table(title, ["strategy", "cases", "hostile replies", "rejected", "accepted, harmless",
                 "crashes", "violations"], [[str(v) for v in row] for row in rows])
    for line in examples_failed[:10]:
        print(line)
    return dict(totals)


def one_run(out: Path, clients: int, hostile: int, rounds: int) -> None:
    """One federation in this process (called in a child process per run)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as honest_app
    from client.hostile import hostile_app
    from server.federation import Federation
    from shared.config import RunConfig

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    config = RunConfig.parse({**FEDERATION, "num-server-rounds": rounds, "min-clients": clients,
                              "out-dir": str(out)})
    federation = Federation(config, out)
    summary: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        summary.update(federation.run(grid))

    run_simulation(
        server_app=server_app,
        client_app=hostile_app(hostile) if hostile else honest_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                                      "log_to_driver": False, "logging_level": "error"}},
    )
    (out / "bench-summary.json").write_text(json.dumps(summary, default=str))


def federation(clients: int, hostile: int, rounds: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        for label, k in (("clean", 0), ("attacked", hostile)):
            out = Path(tmp) / label
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--one-run", str(out), "--clients", str(clients),
                 "--hostile", str(k), "--rounds", str(rounds)],
                capture_output=True, text=True, cwd=ROOT)
            path = out / "bench-summary.json"
            if proc.returncode != 0 or not path.exists():
                print(f"{label} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                results[label] = None
                continue
            summary = json.loads(path.read_text())
            reasons: Counter = Counter()
            for record in summary["history"]:
                reasons.update(record.get("rejected_reasons") or {})
            results[label] = {"rounds": summary["rounds"],
                              "final_accuracy": summary["final_accuracy"],
                              "rejected": summary["rejected_updates"],
                              "reasons": dict(reasons),
                              "seconds": time.perf_counter() - started}
    title = (f"Real federation: digits / mlp, {clients} clients, {rounds} rounds, "
             f"{hostile} hostile (client.hostile, each shape in turn)")
    rows = []
    for label, r in results.items():
        if r is None:
            rows.append([label, "failed", "", "", "", ""])
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"
        rows.append([label, str(r["rounds"]), f"{100 * r['final_accuracy']:.1f}",
                     str(r["rejected"]), reasons, f"{r['seconds']:.0f}"])
    header = ["run", "rounds", "final accuracy %", "rejected", "by reason", "seconds"]
    print_table(title, header, rows)
    if results.get("clean") and results.get("attacked"):
        gap = 100 * (results["clean"]["final_accuracy"] - results["attacked"]["final_accuracy"])
        print(f"accuracy clean - attacked: {gap:+.1f} points (target: within 3)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="fuzz cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--hostile", type=int, default=2, help="hostile nodes (partition < K)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-fuzz", action="store_true")
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        one_run(args.one_run, args.clients, args.hostile, args.rounds)
        return 0
    failed = False
    if not args.skip_fuzz:
        totals = fuzz(args.examples, args.seed)
        failed |= bool(totals.get("crashes") or totals.get("violations"))
    if not args.skip_federation:
        results = federation(args.clients, args.hostile, args.rounds)
        failed |= any(r is None or r["rounds"] != args.rounds for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
