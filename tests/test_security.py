"""Security: a database password never shows up anywhere a user or another tool can read it, and a
checkpoint file cannot run code when a worker resumes from it.

The password check runs real commands against the real PostgreSQL (trust authentication, so any
password is accepted) with a URL that carries a unique password, then scans every stdout and stderr,
the launcher's log files, every study and trial attribute in the database and the artifact files.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from search_helpers import POSTGRES_URL, vadsearch, write_study
from vadsearch.errors import StorageError
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions

PASSWORD = f"Sup3r-Secret-{uuid.uuid4().hex[:10]}"


def with_password(url: str, password: str = PASSWORD) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def secret_url():
    url = with_password(POSTGRES_URL)
    try:
        open_storage(url)
    except StorageError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    return url


@pytest.fixture
def studies(secret_url):
    """Unique study names; deleted afterwards."""
    names = [f"sec-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    yield names
    storage = open_storage(secret_url)
    for name in names:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass


def attribute_texts(url: str, names: list[str]) -> list[str]:
    """Every study and trial attribute (user and system) of the named studies, as stored."""
    storage = open_storage(url)
    texts = []
    for name in names:
        study_id = storage.get_study_id_from_name(name)
        texts += [repr(storage.get_study_user_attrs(study_id)), repr(storage.get_study_system_attrs(study_id))]
        for trial in storage.get_all_trials(study_id, deepcopy=False):
            texts += [repr(trial.user_attrs), repr(trial.system_attrs), repr(trial.params)]
    return texts


def password_rows(url: str) -> int:
    """Rows of Optuna's attribute tables, in the whole database, whose value holds the password."""
    from sqlalchemy import text

    tables = ("study_user_attributes", "study_system_attributes", "trial_user_attributes",
              "trial_system_attributes")
    with open_storage(url).engine.connect() as connection:
        return sum(connection.execute(text(f"SELECT count(*) FROM {table} WHERE value_json LIKE :p"),
                                      {"p": f"%{PASSWORD}%"}).scalar() for table in tables)


@pytest.mark.slow
@pytest.mark.postgres
def test_the_password_appears_in_no_output_log_attribute_or_file(tmp_path, tiny_csv, secret_url, studies):
    lstm, baseline = studies
    lstm_file = write_study(tmp_path / "lstm.toml", name=lstm, data=tiny_csv, search="hidden_size = [4, 8]",
                            max_epochs=1)
    baseline_file = write_study(tmp_path / "base.toml", name=baseline, data=tiny_csv, search="seed = [0, 1, 2]",
                                model="baseline")
    storage = ["--storage", secret_url]
    outputs: dict[str, str] = {}

    def run(label: str, *args: str, env: dict | None = None, code: int | None = 0) -> None:
        result = vadsearch(*args, cwd=tmp_path, env=env)
        outputs[label] = result.stdout + result.stderr
        if code is not None:
            assert result.returncode == code, f"{label}: {outputs[label]}"

    # A worker with progress bars and INFO logs, then a quiet one that finishes the study.
    run("worker", "worker", str(lstm_file), *storage, "--device", "cpu", "--n-trials", "1")
    run("worker -q", "worker", str(lstm_file), *storage, "--device", "cpu", "-q")
    assert "worker stopped (finished)" in outputs["worker -q"]
    # Two launched workers, each with its own log file.
    run("launch", "launch", str(baseline_file), "--workers", "2", *storage, "--device", "cpu",
        "--log-dir", str(tmp_path / "logs"))
    for command in (["status"], ["report", lstm], ["report", lstm, "--format", "json"], ["best", lstm],
                    ["compare", lstm, baseline, "--format", "markdown"]):
        run(" ".join(command), *command, *storage)
    run("status (env)", "status", env={"VADSEARCH_STORAGE": secret_url})
    # Failures: a port where nothing listens, and a study that does not exist.
    wrong_port = with_password(secret_url.replace(":5432/", ":1/"))
    run("worker, wrong port", "worker", str(lstm_file), "--storage", wrong_port, "--device", "cpu", code=3)
    run("status, wrong port", "status", "--storage", wrong_port, code=3)
    run("report, no study", "report", "nope", *storage, code=3)
    assert "127.0.0.1:1" in outputs["status, wrong port"] and "***" in outputs["status, wrong port"]

    logs = {f"log {p.name}": p.read_text() for p in sorted((tmp_path / "logs").glob("*.log"))}
    assert len(logs) == 2
    attributes = attribute_texts(secret_url, [lstm, baseline])
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"]
    leaks = [label for label, text in {**outputs, **logs}.items() if PASSWORD in text]
    leaks += [f"attribute {text[:80]}" for text in attributes if PASSWORD in text]
    leaks += [f"file {p}" for p in files if PASSWORD.encode() in p.read_bytes()]
    checked = len(outputs) + len(logs) + len(attributes) + len(files)
    print(f"\n[security] outputs {len(outputs)}, logs {len(logs)}, attributes {len(attributes)}, "
          f"files {len(files)}: {len(leaks)} hits of the password")
    assert leaks == [], leaks
    assert password_rows(secret_url) == 0
    assert checked > 20 and any("checkpoint_dir" in text for text in attributes)  # the scan saw real data


def test_launch_keeps_the_password_off_worker_command_lines(tmp_path, tiny_csv, monkeypatch):
    """`ps` and /proc/PID/cmdline show every process's arguments to every local user: the launcher must
    hand the URL to its workers in the environment."""
    from vadsearch import launch
    from vadsearch.cli import app

    started = []

    class Recorder:
        def __init__(self, command, env=None, **kwargs):
            started.append((command, env))
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Recorder)
    monkeypatch.setattr("vadsearch.cli._setup_logging", lambda quiet: None)  # keep the session's handlers
    monkeypatch.setattr("vadsearch.cli._open", lambda url: (_ for _ in ()).throw(StorageError("stop here")))
    monkeypatch.setattr("vadsearch.storage.open_storage", lambda url, **kwargs: None)  # launch's own check
    study = write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="seed = [0]", model="baseline")
    secret = f"postgresql+psycopg://u:{PASSWORD}@db.invalid/x"
    CliRunner().invoke(app, ["launch", str(study), "--workers", "2", "--storage", secret,
                             "--log-dir", str(tmp_path / "logs")])
    assert len(started) == 2
    for command, env in started:
        assert not any(PASSWORD in part for part in command), command
        assert env is not None and env.get("VADSEARCH_STORAGE") == secret  # the workers still get it


# ------------------------------------------------------------------------------------ checkpoints


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_worker_never_runs_code_from_a_crafted_checkpoint(tmp_path, tiny_csv):
    from vadsearch.checkpoint import FORMAT
    from vadsearch.data import load_corpus

    spec = load_study_file(write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="hidden_size = [4]",
                                       max_epochs=2))
    config = spec.config_for(spec.grid()[0])
    run_dir = tmp_path / "art" / "s" / config.fingerprint()
    run_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    # Everything a real epoch-1 checkpoint of this configuration would say, plus a pickled payload.
    torch.save({"format": FORMAT, "epoch": 1, "best_epoch": 1, "fingerprint": config.fingerprint(),
                "data_sha256": load_corpus(tiny_csv).sha256, "payload": _Exploit(marker)},
               run_dir / "epoch-0001.pt")
    options = WorkerOptions(storage=f"sqlite:///{tmp_path}/s.db", artifacts=tmp_path / "art", device="cpu",
                            progress=False)
    assert Worker(spec, options).run().stopped == "finished"
    assert not marker.exists(), "unpickling the checkpoint ran code"
    trial = optuna.load_study(study_name="s", storage=open_storage(options.storage, create=False)).trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["resumed_from"] == 0  # refused, so trained from the start
    assert (run_dir / "epoch-0001.pt.rejected").exists()
