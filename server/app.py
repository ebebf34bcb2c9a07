"""The Flower ServerApp (`server.app:app`): validates the run config and runs the federation.

Under `flwr run` / `spikefed-server` the run config is pyproject.toml's `[tool.flwr.app.config]`
merged with the submitted overrides; `spikefed-run` builds the same federation in-process.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from shared.config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.parse(context.run_config)
    Federation(config).run(grid)
