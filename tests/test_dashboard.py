"""`vadsearch dashboard`: optuna-dashboard really serves the study store, on loopback, and stops."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest

from vadsearch.dashboard import _is_loopback
from vadsearch.storage import open_storage

STARTUP_S = 60  # a cold start imports optuna, sqlalchemy and the dashboard on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_the_dashboard_lists_the_studies_and_stops(tmp_path):
    url = f"sqlite:///{tmp_path}/vadsearch.db"
    study = optuna.create_study(study_name="tiny", storage=open_storage(url))
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=2)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vadsearch.cli", "dashboard", "--storage", url,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, listed = time.monotonic() + STARTUP_S, None
        while listed is None and time.monotonic() < deadline and server.poll() is None:
            listed = get_json(f"http://127.0.0.1:{port}/api/studies")
            time.sleep(0.2)
        assert listed is not None, f"no answer within {STARTUP_S} s (exit code {server.poll()})"
        summaries = listed["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["tiny"]
    finally:
        server.terminate()
        try:
            output = server.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
    assert server.returncode is not None
    assert "http://127.0.0.1:" in output and "Traceback" not in output
    assert get_json(f"http://127.0.0.1:{port}/api/studies") is None  # stopped: nothing listens any more


def test_a_missing_database_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from vadsearch.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--storage", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 3 and "no study database" in result.output


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("example.org", False)])
def test_loopback_hosts(host, loopback):
    assert _is_loopback(host) is loopback
