"""The app pin of `spikefed-client --app-hash`, loaded by Python itself in every process below it.

`spikefed-client --app-hash HASH` puts this directory first on PYTHONPATH and HASH in
SPIKEFED_APP_HASH for its SuperNode, so Python imports this module (the `sitecustomize` hook)
at the start of each process the SuperNode starts. In a `flwr-clientapp` process, the one that
installs and runs a run's app (FAB), it wraps Flower's `install_from_fab` so that a FAB whose
sha256 (Flower's FAB hash, which `spikefed-server` prints) is not the pinned one is refused before
anything from it is unpacked, imported or run: the ClientApp fails, the server gets an error
reply, and spikefed-client prints one line. Every other process is left untouched.
"""

from __future__ import annotations

import os
import sys

PIN_ENV = "SPIKEFED_APP_HASH"
REFUSED = "spikefed-client refused the run"  # spikefed-client looks for this in the log


def _pin_clientapp(pinned: str) -> None:
    import hashlib

    from flwr.supernode.runtime import run_clientapp

    install = run_clientapp.install_from_fab

    def pinned_install(fab_file, *args, **kwargs):  # type: ignore[no-untyped-def]
        content = fab_file if isinstance(fab_file, bytes) else open(fab_file, "rb").read()
        digest = hashlib.sha256(content).hexdigest()
        if digest != pinned:
            message = (f"{REFUSED}: its app (FAB) sha256 {digest} is not the pinned {pinned} "
                       "(--app-hash)")
            print(message, file=sys.stderr, flush=True)
            raise PermissionError(message)
        return install(fab_file, *args, **kwargs)

    run_clientapp.install_from_fab = pinned_install


if os.environ.get(PIN_ENV) and os.path.basename(sys.argv[0] if sys.argv else "") == (
        "flwr-clientapp"):
    try:
        _pin_clientapp(os.environ[PIN_ENV].strip().lower())
    except (ImportError, AttributeError) as err:  # fail closed: no pin, no app
        print(f"{REFUSED}: the app pin cannot hook this Flower version ({err})", file=sys.stderr,
              flush=True)
        os._exit(1)
