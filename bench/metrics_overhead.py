"""What the Prometheus exporter (`server.metrics`) adds to a federated round.

Three figures, each against the work of a round:
1. the exporter's own per-round work (`on_round_start` + `on_round_end`, the only code the
   federation runs for it), timed over many rounds, as a share of one round's duration;
2. one scrape: rendering the exposition and serving it over HTTP from the exporter's thread;
3. the client's real training step (the run config's model; batch `batch-size` of its dataset),
   timed alternately with and without a scraper hitting the live endpoint every
   `--scrape-interval` seconds (1 s, as the tests' Prometheus does; the compose setup uses 5 s).

The round duration is the median `duration_s` of a recorded run (`--run runs/<name>`) or, without
one, a lower bound: one client's single local epoch on its partition (a real round is several
epochs plus aggregation and evaluation, so the real share is smaller still).

    python bench/metrics_overhead.py [--run runs/quick] [--rounds 5] [--seconds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import alternate, print_table, warn_if_busy  # noqa: E402
from client.train import train_local  # noqa: E402
from server.metrics import MetricsExporter  # noqa: E402
from server.strategy import RoundStats  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.data import load_dataset, partition_indices  # noqa: E402
from shared.rebuild import build_from_spec  # noqa: E402
from shared.snn import model_layout  # noqa: E402


def exporter_round_seconds(repeats: int = 5, rounds: int = 2000) -> float:
    """Median seconds of the exporter's work for one round (start + end of the round)."""
    exporter = MetricsExporter()
    exporter.on_start(RunConfig(), 1, {"round": 0, "accuracy": 0.1, "loss": 2.3})
    entry = {"round": 1, "accuracy": 0.9, "loss": 0.3, "clients": 5, "failed": 0, "rejected": 1,
             "bytes_up": 10**6, "bytes_down": 10**6, "energy_j": 0.01, "cycles": 10**7,
             "dram_bytes": 10**8, "duration_s": 20.0, "spike_density": 0.1}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for r in range(1, rounds + 1):
            stats = RoundStats(r)
            exporter.on_round_start(stats)
            stats.rejected, stats.rejected_reasons = 1, {"norm": 1}
            entry["round"] = r
            exporter.on_round_end(entry)
        times.append((time.perf_counter() - start) / rounds)
    return statistics.median(times)


def scrape_seconds(repeats: int = 200) -> tuple[float, float, int]:
    """Median seconds to render the exposition, and to fetch it over HTTP; its size in bytes."""
    exporter = MetricsExporter()
    url = exporter.start("127.0.0.1", 0)
    try:
        render, fetch = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            body = exporter.exposition()
            render.append(time.perf_counter() - start)
            start = time.perf_counter()
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
            fetch.append(time.perf_counter() - start)
    finally:
        exporter.stop()
    return statistics.median(render), statistics.median(fetch), len(body)


def local_epoch_seconds(config: RunConfig, clients: int) -> float:
    """One client's single local epoch on partition 0 of `clients` (chip accounting on)."""
    from shared.neurocore import ChipConfig

    x, y = load_dataset(config.dataset, "train").tensors
    idx = torch.as_tensor(partition_indices(y, clients, 0, scheme=config.partitioning,
                                            alpha=config.dirichlet_alpha, seed=config.seed))
    chip = None if config.chip == "none" else ChipConfig.preset(config.chip,
                                                                 optimizer=config.optimizer)
    result = train_local(build_from_spec(config.model_spec()),
                         torch.utils.data.TensorDataset(x[idx], y[idx]), epochs=1,
                         batch_size=config.batch_size, optimizer=config.optimizer, lr=config.lr,
                         seed=0, chip=chip)
    return result.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory to take the "
                        "round duration from (its metrics.jsonl)")
    parser.add_argument("--clients", type=int, default=5, help="partitions, without --run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RunConfig()

    per_round = exporter_round_seconds()
    render, fetch, size = scrape_seconds()
    if args.run is not None:
        lines = (args.run / "metrics.jsonl").read_text().splitlines()
        round_s = statistics.median(json.loads(line)["duration_s"] for line in lines)
        round_what = f"median round of {args.run}"
    else:
        round_s = local_epoch_seconds(config, args.clients)
        round_what = f"lower bound: one client's 1 local epoch ({args.clients} partitions)"

    # training steps with and without a scraper on the live endpoint (alternating rounds)
    torch.manual_seed(0)
    model = build_from_spec(config.model_spec())
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x_all, y_all = load_dataset(config.dataset, "train").tensors
    batches = [(model_layout(x_all[i:i + config.batch_size]), y_all[i:i + config.batch_size])
               for i in range(0, 8 * config.batch_size, config.batch_size)]
    exporter = MetricsExporter()
    url = exporter.start("127.0.0.1", 0)
    scraping, done = threading.Event(), threading.Event()
    scrapes = [0]

    def scraper() -> None:
        while not done.is_set():
            if scraping.is_set():
                with urllib.request.urlopen(url, timeout=10) as response:
                    response.read()
                scrapes[0] += 1
            done.wait(args.scrape_interval)

    def step(scraped: bool):
        def run(i: int) -> None:
            (scraping.set if scraped else scraping.clear)()
            x, y = batches[i % len(batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    model.train()
    try:
        rates, others = alternate({"not scraped": step(False), "scraped": step(True)},
                                  args.rounds, args.seconds, args.warmup)
    finally:
        done.set()
        thread.join()
        exporter.stop()
    plain, scraped = (statistics.median(rates[k]) for k in ("not scraped", "scraped"))

    print(f"torch {torch.__version__} | threads {args.threads} | {config.model} "
          f"T={config.time_steps} batch {config.batch_size} | exposition {size:,} bytes")
    print_table("exporter cost", ["what", "time", "share of a round"], [
        ["per-round update (start + end)", f"{per_round * 1e6:.1f} us",
         f"{per_round / round_s:.2e}"],
        ["render one scrape", f"{render * 1e6:.1f} us", f"{render / round_s:.2e}"],
        ["serve one scrape (HTTP, 127.0.0.1)", f"{fetch * 1e3:.2f} ms", f"{fetch / round_s:.2e}"],
        ["round duration", f"{round_s:.2f} s", round_what],
    ])
    print_table(f"training step with the endpoint scraped every {args.scrape_interval:g} s",
                ["", "steps/s", "ms/step", "vs not scraped"],
                [["not scraped", f"{plain:.2f}", f"{1e3 / plain:.1f}", "1.000x"],
                 ["scraped", f"{scraped:.2f}", f"{1e3 / scraped:.1f}", f"{plain / scraped:.3f}x"]])
    print(f"exporting adds {per_round / round_s:.1e} of a round ({per_round * 1e6:.0f} us per "
          f"round vs {round_s:.2f} s); a scrape costs {render * 1e6:.0f} us of render; "
          f"{scrapes[0]} scrapes during the timed steps")
    warn_if_busy(others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
