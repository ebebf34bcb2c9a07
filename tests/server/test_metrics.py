"""server.metrics and spikefed-monitor: the exporter's values, promtool, the Grafana dashboard's
PromQL, one-line errors, and a real run scraped by a real Prometheus server and the monitor."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import free_port

from server.cli import RunError
from server.metrics import KNOWN_REASONS, MAX_REASONS, MetricsExporter, start_exporter
from server.monitor import History, Snapshot, parse_metrics, sparkline
from server.strategy import RoundStats
from shared.config import RunConfig
from shared.rundir import RoundRecord

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SPEC_METRICS = {
    "spikefed_round", "spikefed_rounds_completed_total", "spikefed_global_accuracy",
    "spikefed_global_loss", "spikefed_round_duration_seconds_bucket",
    "spikefed_client_updates_total", "spikefed_rejected_updates_total",
    "spikefed_clients_participating", "spikefed_update_bytes_total",
    "spikefed_neurocore_energy_joules_total", "spikefed_neurocore_dram_bytes_total",
    "spikefed_neurocore_cycles_total", "spikefed_spike_density", "spikefed_build_info",
}


def entry(round_: int, **changes) -> RoundRecord:
    """A round record as `Federation` hands it to observers."""
    base = {"round": round_, "accuracy": 0.5 + round_ / 10, "loss": 2.0 - round_ / 10,
            "clients": 3, "failed": 1, "rejected": 0, "bytes_up": 1000, "bytes_down": 3000,
            "energy_j": 0.25, "cycles": 700, "dram_bytes": 5000, "duration_s": 4.0,
            "spike_density": 0.125}
    return RoundRecord(**{**base, **changes})


def play(exporter: MetricsExporter, rounds: int, *, first: int = 1,
         reasons: dict[str, int] | None = None) -> None:
    exporter.on_start(RunConfig.parse({"num-server-rounds": first + rounds - 1}), first,
                      {"round": first - 1, "accuracy": 0.1, "loss": 2.3})
    for r in range(first, first + rounds):
        stats = RoundStats(r)
        exporter.on_round_start(stats)
        stats.rejected_reasons = dict(reasons or {})
        stats.rejected = sum(stats.rejected_reasons.values())
        exporter.on_round_end(entry(r, rejected=stats.rejected,
                                    rejected_reasons=dict(stats.rejected_reasons)))


def samples(exporter: MetricsExporter) -> dict[tuple[str, tuple], float]:
    text = exporter.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}




def test_labelled_counters_read_zero_before_any_round():
    values = samples(MetricsExporter())
    for status in ("accepted", "rejected", "failed"):
        assert values[("spikefed_client_updates_total", (("status", status),))] == 0
    for direction in ("up", "down"):
        assert values[("spikefed_update_bytes_total", (("direction", direction),))] == 0
    for reason in KNOWN_REASONS:
        assert values[("spikefed_rejected_updates_total", (("reason", reason),))] == 0
    assert {name for name, _ in values} >= SPEC_METRICS - {"spikefed_round_duration_seconds_bucket"}


def test_rounds_update_every_metric():
    exporter = MetricsExporter()
    play(exporter, 2, reasons={"norm": 2, "non-finite": 1})
    v = samples(exporter)
    assert v[("spikefed_round", ())] == 2 and v[("spikefed_rounds_planned", ())] == 2
    assert v[("spikefed_rounds_completed_total", ())] == 2
    assert v[("spikefed_global_accuracy", ())] == pytest.approx(0.7)
    assert v[("spikefed_global_loss", ())] == pytest.approx(1.8)
    assert v[("spikefed_round_duration_seconds_count", ())] == 2
    assert v[("spikefed_round_duration_seconds_sum", ())] == 8.0
    assert v[("spikefed_clients_participating", ())] == 3
    assert v[("spikefed_client_updates_total", (("status", "accepted"),))] == 6
    assert v[("spikefed_client_updates_total", (("status", "failed"),))] == 2
    assert v[("spikefed_client_updates_total", (("status", "rejected"),))] == 6
    assert v[("spikefed_rejected_updates_total", (("reason", "norm"),))] == 4
    assert v[("spikefed_rejected_updates_total", (("reason", "non-finite"),))] == 2
    assert v[("spikefed_update_bytes_total", (("direction", "up"),))] == 2000
    assert v[("spikefed_update_bytes_total", (("direction", "down"),))] == 6000
    assert v[("spikefed_neurocore_energy_joules_total", ())] == 0.5
    assert v[("spikefed_neurocore_cycles_total", ())] == 1400
    assert v[("spikefed_neurocore_dram_bytes_total", ())] == 10000
    assert v[("spikefed_spike_density", ())] == 0.125


def test_resumed_run_counts_the_checkpoints_rounds_and_unexplained_rejections():
    exporter = MetricsExporter()
    exporter.on_start(RunConfig.parse({"num-server-rounds": 5}), 4,
                      {"round": 3, "accuracy": 0.8, "loss": 0.5})
    exporter.on_round_start(RoundStats(4))
    exporter.on_round_end(entry(4, rejected=2))  # validation without per-reason counts
    v = samples(exporter)
    assert v[("spikefed_rounds_completed_total", ())] == 4
    assert v[("spikefed_rejected_updates_total", (("reason", "other"),))] == 2


def test_rejection_reasons_keep_a_bounded_label_set():
    exporter = MetricsExporter()
    play(exporter, 1, reasons={f"reason-{i}": 1 for i in range(3 * MAX_REASONS)})
    v = samples(exporter)
    reasons = {dict(labels)["reason"]: value for (name, labels), value in v.items()
               if name == "spikefed_rejected_updates_total"}
    assert len(reasons) == MAX_REASONS
    assert sum(reasons.values()) == 3 * MAX_REASONS  # nothing lost: the excess counts as other
    assert reasons["other"] > 0


def test_promtool_check_metrics_is_clean():
    promtool = shutil.which("promtool")
    if promtool is None:
        require_prometheus()
    exporter = MetricsExporter()
    play(exporter, 2, reasons={"norm": 1})
    result = subprocess.run([promtool, "check", "metrics"], input=exporter.exposition(),
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "spikefed.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard has no PromQL"
    return {name for expr in exprs for name in re.findall(r"\bspikefed_[a-z0-9_]+", expr)}


def test_every_dashboard_metric_exists_in_the_exposition_and_vice_versa():
    exporter = MetricsExporter()
    play(exporter, 1)
    exposed = {name for name, _ in samples(exporter)}
    used = dashboard_metric_names()
    assert used <= exposed, f"dashboard metrics missing from the exposition: {used - exposed}"
    families = {n for n in exposed if not n.endswith("_created")}
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    for family in {re.sub(r"_(bucket|sum|count)$", "", n) for n in families}:
        assert family in covered, f"no dashboard panel for {family}"


def test_deploy_files_fit_together():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"server", "client-0", "client-1", "client-2", "prometheus", "grafana"} <= set(services)
    assert "spikefed-server" in services["server"]["command"]
    assert all("spikefed-client" in services[f"client-{i}"]["command"] for i in range(3))
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["server:9464"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "spikefed.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["datasources"][0]["uid"]}
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" /
                                "prometheus.yml")], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_busy_port_is_a_one_line_error_unless_any_port_is_fine():
    first = MetricsExporter()
    url = first.start("127.0.0.1", 0)
    port = int(urllib.parse.urlsplit(url).port)
    try:
        with pytest.raises(RunError, match=f"127.0.0.1:{port} is already in use") as info:
            MetricsExporter().start("127.0.0.1", port)
        assert "\n" not in str(info.value)
        other = MetricsExporter()
        other_url = other.start("127.0.0.1", port, any_port_if_busy=True)
        assert other_url != url and b"spikefed_round" in urllib.request.urlopen(other_url).read()
        other.stop()
    finally:
        first.stop()


def test_monitor_parses_a_scrape_and_draws_sparklines():
    exporter = MetricsExporter()
    history = History()
    play(exporter, 1)
    history.add(parse_metrics(exporter.exposition().decode()))
    exporter.on_round_start(RoundStats(2))
    exporter.on_round_end(entry(2, clients=2))
    snap = parse_metrics(exporter.exposition().decode())
    history.add(snap)
    assert isinstance(snap, Snapshot)
    assert (snap.round, snap.rounds_completed, snap.clients) == (2, 2, 2)
    assert snap.accuracy == pytest.approx(0.7) and snap.updates["accepted"] == 5
    assert snap.bytes == {"up": 2000, "down": 6000} and snap.mean_round_seconds == 4.0
    assert history.series(0) == pytest.approx([0.6, 0.7])
    assert sparkline([0, 1, 2]) == "▁▄█" and sparkline([]) == ""
    with pytest.raises(ValueError, match="no spikefed"):
        parse_metrics("# HELP other_metric x\n# TYPE other_metric gauge\nother_metric 1\n")


def run_cmd(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_monitor_unreachable_url_is_one_line_and_exit_2():
    port = free_port()
    result = run_cmd("server.monitor", "--url", f"http://127.0.0.1:{port}/metrics", "--once")
    assert result.returncode == 2
    assert f"cannot read metrics from http://127.0.0.1:{port}/metrics" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_spikefed_run_busy_metrics_port_is_one_line_and_exit_2(tmp_path):
    holder = MetricsExporter()
    url = holder.start("127.0.0.1", 0)
    try:
        port = str(urllib.parse.urlsplit(url).port)
        result = run_cmd("server.run", "--out", str(tmp_path / "run"), "--metrics-port", port,
                         "--run-config", "dataset=digits")
    finally:
        holder.stop()
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def require_prometheus() -> None:
    """A missing Prometheus fails the test with the fix: these tests need the real server."""
    pytest.fail("needs Debian's prometheus package: apt-get install prometheus (.ci/run does)")


def wait_for(predicate, what: str, deadline: float, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    """Poll `predicate` until it returns a truthy value; fail (with the log) when `proc` exits
    or the deadline passes. A bound on hangs, not a timing assertion."""
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n"
                        + (log.read_text()[-3000:] if log else ""))
        time.sleep(0.5)
    pytest.fail(f"gave up waiting for {what}" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


def prom_query(base: str, query: str) -> list[dict]:
    body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    if body is None:
        return []
    data = json.loads(body)
    assert data["status"] == "success", data
    return data["data"]["result"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_live_run_is_read_by_prometheus_and_the_monitor(tmp_path):
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        require_prometheus()
    metrics_port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "spikefed",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    prom_log, run_log = tmp_path / "prometheus.log", tmp_path / "run.log"
    prom_base = f"http://127.0.0.1:{prom_port}"
    out = tmp_path / "run"
    procs: list[subprocess.Popen] = []
    try:
        with prom_log.open("w") as log:
            procs.append(subprocess.Popen(
                [shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: http_get(f"{prom_base}/-/ready"), "Prometheus ready",
                 time.monotonic() + 120, procs[0], prom_log)
        with run_log.open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "server.run", "--clients", "2", "--rounds", "2",
                 "--out", str(out), "--metrics-port", str(metrics_port),
                 "--metrics-linger", "600", "--run-config",
                 "dataset=digits time-steps=2 local-epochs=1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "COLUMNS": "200"}))
        run = procs[1]
        # the run finishes and keeps serving its final metrics until it is stopped below
        wait_for(lambda: "serving the final metrics" in run_log.read_text(), "the run's end",
                 time.monotonic() + 600, run, run_log)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["rejected_updates"] == 0

        monitor = run_cmd("server.monitor", "--url",
                          f"http://127.0.0.1:{metrics_port}/metrics", "--once")
        assert monitor.returncode == 0, monitor.stdout + monitor.stderr
        assert "round 2/2" in monitor.stdout
        assert f"{summary['final_accuracy']:.2%}" in monitor.stdout

        def completed() -> list[dict]:
            result = prom_query(prom_base, 'spikefed_rounds_completed_total{job="spikefed"}')
            return result if result and float(result[0]["value"][1]) == 2 else []

        wait_for(completed, "Prometheus to scrape round 2", time.monotonic() + 120,
                 procs[0], prom_log)
        (accuracy,) = prom_query(prom_base, "spikefed_global_accuracy")
        assert float(accuracy["value"][1]) == pytest.approx(summary["final_accuracy"], abs=1e-12)
        (up,) = prom_query(prom_base, 'spikefed_update_bytes_total{direction="up"}')
        assert float(up["value"][1]) == sum(e["bytes_up"] for e in summary["history"])
        (energy,) = prom_query(prom_base, "spikefed_neurocore_energy_joules_total")
        assert float(energy["value"][1]) == pytest.approx(
            sum(e["energy_j"] for e in summary["history"]))

        run.send_signal(signal.SIGTERM)  # ends the linger; the run exits cleanly
        assert run.wait(timeout=120) == 0, run_log.read_text()[-3000:]
        assert "Traceback" not in run_log.read_text()
        assert {p.name for p in (out / "plots").iterdir()} == {
            "accuracy_loss.png", "energy_dram.png", "bytes.png"}
        report = (out / "report.md").read_text()
        assert "](plots/accuracy_loss.png)" in report and "| 2 |" in report
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_start_exporter_follows_the_run_config():
    assert start_exporter(RunConfig.parse({"metrics-port": 0})) is None  # off
    exporter = start_exporter(RunConfig.parse({"metrics-port": free_port()}))
    assert exporter is not None
    try:
        assert b"spikefed_build_info" in urllib.request.urlopen(exporter.url).read()
        busy = RunConfig.parse({"metrics-port": urllib.parse.urlsplit(exporter.url).port})
        with pytest.raises(RunError, match="already in use"):
            start_exporter(busy)
    finally:
        exporter.stop()
    with pytest.raises(RunError, match="cannot be opened"):  # an address not on this machine
        start_exporter(RunConfig.parse({"metrics-host": "192.0.2.1"}))
