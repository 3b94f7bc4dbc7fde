"""`vadsearch dashboard`: optuna-dashboard really serves the study store, on loopback, and stops."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import optuna
import pytest

from vadsearch.dashboard import _is_loopback, open_server, run
from vadsearch.errors import ConfigError
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


@pytest.fixture
def store(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/vadsearch.db"
    optuna.create_study(study_name="tiny", storage=open_storage(url))
    return url


@pytest.fixture
def taken_port():
    """A port that a real socket of this test listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def invoke_dashboard(*args: str):
    from typer.testing import CliRunner

    from vadsearch.cli import app

    return CliRunner().invoke(app, ["dashboard", *args])


def assert_one_error_line(result, exit_code: int, message: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stderr.splitlines() == [message]
    assert "Traceback" not in result.output and "dashboard on http" not in result.output  # no banner
    assert isinstance(result.exception, SystemExit)  # the CLI's exit, not an escaped exception


def test_a_port_in_use_is_one_line_before_the_banner(store, taken_port):
    result = invoke_dashboard("--storage", store, "--port", str(taken_port))
    assert_one_error_line(result, 2, f"error: cannot serve the dashboard on 127.0.0.1:{taken_port}: "
                                     "Address already in use (pass another --port)")


@pytest.mark.parametrize("host", ["999.1.1.1", "nosuchhost.invalid"])
def test_an_unknown_host_is_one_line(store, host):
    # Not loopback either: the warning about that must not come before the error.
    result = invoke_dashboard("--storage", store, "--host", host, "--port", "8099")
    assert_one_error_line(result, 2, f"error: cannot serve the dashboard on {host}:8099: "
                                     "Name or service not known (pass another --host)")


@pytest.mark.parametrize("args, exit_code, message", [
    (["--port", "70000"], 2, "error: --port must be in 1..65535, got 70000"),
    (["--port", "-1"], 2, "error: --port must be in 1..65535, got -1"),
    (["--port", "0"], 2, "error: --port must be in 1..65535, got 0"),
    (["--storage", "sqlite:////nonexistent/dir/x.db"], 3,
     "error: no study database at /nonexistent/dir/x.db: run a worker first, or pass --storage"),
    (["--storage", "foo://x"], 2,
     "error: unsupported database 'foo' in foo://x: use sqlite:///FILE or postgresql+psycopg://…"),
])
def test_bad_options_fail_before_the_banner(store, taken_port, args, exit_code, message):
    # The storage is checked before the port is bound: a bad one is reported even on a taken port.
    defaults = ["--storage", store, "--port", str(taken_port)]
    result = invoke_dashboard(*defaults, *args)
    assert_one_error_line(result, exit_code, message)


def test_open_server_binds_and_run_releases_the_port(store, taken_port):
    with pytest.raises(ConfigError, match="Address already in use"):
        open_server(store, port=taken_port)
    port = free_port()
    server = open_server(store, port=port)
    thread = threading.Thread(target=run, args=(server,), daemon=True)
    thread.start()
    try:
        listed = get_json(f"http://127.0.0.1:{port}/api/studies")
        assert [s["study_name"] for s in listed["study_summaries"]] == ["tiny"]
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()
    with socket.socket() as s:
        # As a new server binds (wsgiref sets SO_REUSEADDR): without it, the TIME_WAIT of the connection the
        # server closed first refuses the bind at random. A socket still listening is refused either way.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # released: the port can be bound again


def test_a_missing_database_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from vadsearch.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--storage", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 3 and "no study database" in result.output


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("example.org", False)])
def test_loopback_hosts(host, loopback):
    assert _is_loopback(host) is loopback
