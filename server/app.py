"""The Flower ServerApp (`server.app:app`): validates the run config and runs the federation.

Under `flwr run` / `spikefed-server` the run config is pyproject.toml's `[tool.flwr.app.config]`
merged with the submitted overrides; `spikefed-run` builds the same federation in-process. The
ServerApp serves the run's Prometheus metrics (`server.metrics`) on `metrics-host:metrics-port`
while the run lasts, and writes the run's plots and report.md at its end.
`spikefed-server --resume` sets SPIKEFED_RESUME=1 in the SuperLink's environment, which the
ServerApp process inherits: the run then continues after the last good checkpoint in `out-dir`
(resuming is a property of the server process, not of the run config the clients receive).
"""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from server.metrics import DEFAULT_PORT, start_exporter
from server.report import write_report
from shared.config import RunConfig

RESUME_ENV = "SPIKEFED_RESUME"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.parse(context.run_config)
    federation = Federation(config, resume=os.environ.get(RESUME_ENV) == "1")
    # the run's /metrics endpoint (metrics-port 0: none); on the default port, when another run
    # already holds it, a free port (logged) instead of a failed run
    exporter = start_exporter(config, any_port_if_busy=config.metrics_port == DEFAULT_PORT)
    federation.observer = exporter
    try:
        summary = federation.run(grid)
    finally:
        if exporter is not None:
            exporter.stop()
    write_report(summary, federation.out_dir)
