"""`vadsearch dashboard`: optuna-dashboard on the study store.

optuna-dashboard shows what Optuna stores: every study, its trials, their parameters, states and user
attributes (dev and test scores per dimension, best epoch, worker, `checkpoint_dir`), the per-epoch dev
curves (intermediate values) and Optuna's plots. It shows files only when they were uploaded through
`optuna.artifacts`; vadsearch keeps its checkpoints as plain files in the artifact directory, so they are
not listed there: a trial's `checkpoint_dir` attribute says where they are.
"""

from __future__ import annotations

import ipaddress
import logging

from vadsearch.errors import ConfigError

log = logging.getLogger(__name__)


def serve(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard until interrupted. The dashboard can edit and delete studies: keep it on the
    loopback address unless everyone who can reach `host` may do that."""
    from optuna_dashboard import run_server

    from vadsearch.storage import open_storage

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if not _is_loopback(host):
        log.warning("the dashboard listens on %s: anyone who can reach it can read, edit and delete studies", host)
    run_server(open_storage(storage, create=False), host=host, port=port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
