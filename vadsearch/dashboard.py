"""`vadsearch dashboard`: optuna-dashboard on the study store.

optuna-dashboard shows what Optuna stores: every study, its trials, their parameters, states and user
attributes (dev and test scores per dimension, best epoch, worker, `checkpoint_dir`), the per-epoch dev
curves (intermediate values) and Optuna's plots. It shows files only when they were uploaded through
`optuna.artifacts`; vadsearch keeps its checkpoints as plain files in the artifact directory, so they are
not listed there: a trial's `checkpoint_dir` attribute says where they are.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

from vadsearch.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)


def open_server(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """The dashboard's server, bound but not yet serving: everything that can fail (port, storage,
    address) fails here, before anyone is told the dashboard runs. The dashboard can edit and delete
    studies: keep it on the loopback address unless everyone who can reach `host` may do that."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from optuna_dashboard import wsgi

    from vadsearch.storage import open_storage

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    store = open_storage(storage, create=False)
    # Bound here rather than by optuna_dashboard.run_server, whose bind errors surface only once it serves.
    server_class = WSGIServer
    if ":" in host:  # wsgiref binds IPv4 only
        server_class = type("WSGIServer6", (WSGIServer,), {"address_family": socket.AF_INET6})
    try:
        server = make_server(host, port, wsgi(store), server_class, WSGIRequestHandler)
    except OSError as exc:
        store.engine.dispose()
        advice = "--port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise ConfigError(f"cannot serve the dashboard on {_authority(host, port)}: "
                          f"{exc.strerror or exc} (pass another {advice})") from None
    if not _is_loopback(host):
        log.warning("the dashboard listens on %s: anyone who can reach it can read, edit and delete studies", host)
    return server


def run(server: WSGIServer) -> None:
    """Serve until interrupted (Ctrl-C), then release the port."""
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def url(host: str, port: int) -> str:
    return f"http://{_authority(host, port)}/"


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
