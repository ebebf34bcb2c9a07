"""shared.neurocore.plots: the four PNG plots of a report."""

from __future__ import annotations

import torch

from shared.neurocore import ChipConfig, NeuroCore
from shared.neurocore.plots import write_plots
from shared.snn import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png_and_follow_what_the_report_has(rand_batch, tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, input_size=8, time_steps=2)
    chip = NeuroCore(ChipConfig.preset("paper-28nm-fp16"))
    counts, gpu = chip.trace(model, rand_batch((4, 1, 8, 8)), torch.arange(4))
    full = write_plots(chip.report(counts, gpu), tmp_path / "full",
                       chip.sweep_cores(counts, (1, 2, 4)))
    assert sorted(p.name for p in full) == [
        "core_scaling.png", "dram_vs_gpu.png", "energy_by_phase.png", "sparsity_heatmap.png"]
    assert all(p.read_bytes().startswith(PNG) for p in full)
    bare = write_plots(chip.report(counts), tmp_path / "bare")  # no sweep, no GPU baseline
    assert sorted(p.name for p in bare) == ["energy_by_phase.png", "sparsity_heatmap.png"]
