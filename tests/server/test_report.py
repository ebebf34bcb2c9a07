"""server.report: a finished run's plots and report.md, from its summary."""

from __future__ import annotations

import matplotlib.image

from server.report import write_report


def summary(rounds: int) -> dict:
    history = [{"round": r, "accuracy": 0.5 + r / 20, "loss": 1.5 - r / 10, "clients": 3,
                "failed": int(r == 2), "rejected": 1, "bytes_up": 52_000, "bytes_down": 53_000,
                "energy_j": 1e-3 * r, "cycles": 10**6, "dram_bytes": 3_000_000,
                "duration_s": 1.5} for r in range(1, rounds + 1)]
    return {"rounds": rounds, "final_accuracy": history[-1]["accuracy"] if history else 0.1,
            "best_accuracy": max((e["accuracy"] for e in history), default=None),
            "rejected_updates": rounds, "duration_s": 9.0, "history": history,
            "initial": {"round": 0, "accuracy": 0.1, "loss": 2.3},
            "config": {"model": "csnn", "neuron": "lif", "time-steps": 4, "weight-bits": 4,
                       "dataset": "digits", "min-clients": 3, "strategy": "fedavg",
                       "partitioning": "iid", "chip": "edge-int8"}}


def test_report_embeds_the_three_plots_and_tabulates_every_round(tmp_path):
    report = write_report(summary(3), tmp_path)
    text = report.read_text()
    for name in ("accuracy_loss.png", "energy_dram.png", "bytes.png"):
        image = matplotlib.image.imread(tmp_path / "plots" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # drawn, not blank
        assert f"](plots/{name})" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "round" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    assert "| 2 | 60.00 % | 1.300 | 3 | 1 | 1 | 0.05 | 0.05 | 2.000 | 3.00 | 1.5 |" in text
    assert "final accuracy: 65.00 %" in text and "rejected updates: 3" in text


def test_a_run_without_rounds_gets_a_report_and_no_plots(tmp_path):
    report = write_report(summary(0), tmp_path)
    assert "rounds: 0" in report.read_text() and "![" not in report.read_text()
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())
