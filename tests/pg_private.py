"""A private PostgreSQL server for fault tests: its own data directory and port, stopped and started
at will. Built from Debian's initdb/pg_ctl, run as the `postgres` user (initdb refuses root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    def __init__(self, listen: str = "127.0.0.1") -> None:
        # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="vadsearch-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.port = free_port()
        self.listen = listen
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        if os.geteuid() == 0:
            args = ("runuser", "-u", "postgres", "--", *args)
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def init(self) -> PrivateServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def allow(self, cidr: str) -> None:
        """Let clients from `cidr` in without a password (initdb trusts only local ones)."""
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {cidr} trust\n")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={self.listen} -c fsync=off"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects every client, as a restart or failover does; `immediate` is a crash."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def private_server(listen: str = "127.0.0.1") -> PrivateServer:
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("initdb/pg_ctl not installed (Debian package postgresql)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: cannot start PostgreSQL")
    server = PrivateServer(listen).init()
    server.start()
    return server
