"""The Flower ServerApp (`server.app:app`): validates the run config and runs the federation.

Under `flwr run` / `spikefed-server` the run config is pyproject.toml's `[tool.flwr.app.config]`
merged with the submitted overrides; `spikefed-run` builds the same federation in-process.
`spikefed-server --resume` sets SPIKEFED_RESUME=1 in the SuperLink's environment, which the
ServerApp process inherits: the run then continues after the last good checkpoint in `out-dir`
(resuming is a property of the server process, not of the run config the clients receive).
"""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from shared.config import RunConfig

RESUME_ENV = "SPIKEFED_RESUME"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.parse(context.run_config)
    Federation(config, resume=os.environ.get(RESUME_ENV) == "1").run(grid)
