"""The database goes away while workers train: a private PostgreSQL is stopped and started again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import synthetic_rows, write_csv
from pg_private import private_server
from search_helpers import points_finished, write_study
from vadsearch.storage import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def server():
    server = private_server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("restart") / "corpus.csv", synthetic_rows(1500, 100, 100, seed=2))


def start_worker(cwd: Path, study: Path, url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vadsearch.cli", "worker", str(study), "--storage", url, "--device", "cpu", "-q",
         "--heartbeat-interval", "1", *extra],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_four_workers_ride_out_a_database_restart(tmp_path, corpus, server):
    study_file = write_study(tmp_path / "r.toml", name="restart", data=corpus, max_epochs=4,
                             search="hidden_size = [8, 16]\nlr = [0.001, 0.003]\nbidirectional = [false, true]")
    workers = [start_worker(tmp_path, study_file, server.url, "--grace-period", "60", "--db-timeout", "120")
               for _ in range(4)]
    wait_for(lambda: any(tmp_path.glob("vadsearch-artifacts/*/*/epoch-0001.pt")), what="a first checkpoint")
    server.stop("fast")  # every connection is cut, as in a restart or failover
    time.sleep(5)
    server.start()
    outputs = [w.communicate(timeout=600)[0] for w in workers]

    assert [w.returncode for w in workers] == [0] * 4, "\n".join(outputs)
    assert any("unreachable" in out for out in outputs), "no worker noticed the outage"
    assert not any("Traceback" in out for out in outputs), "\n".join(outputs)
    study = optuna.load_study(study_name="restart", storage=open_storage(server.url))
    finished = points_finished(study)
    assert len(finished) == 8 and set(finished.values()) == {1}  # none lost, none twice
    assert study.get_trials(states=(TrialState.FAIL,)) == []


def test_a_worker_gives_up_after_its_limit_and_its_trial_resumes_elsewhere(tmp_path, corpus, server):
    study_file = write_study(tmp_path / "r.toml", name="giveup", data=corpus, max_epochs=6,
                             search="hidden_size = [16]")
    worker = start_worker(tmp_path, study_file, server.url, "--grace-period", "2", "--db-timeout", "3")
    wait_for(lambda: any(tmp_path.glob("vadsearch-artifacts/*/*/epoch-0002.pt")), what="a second checkpoint")
    server.stop("fast")
    output = worker.communicate(timeout=120)[0]
    server.start()

    assert worker.returncode == 3, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lost the database" in lines[0] and "resumable" in lines[0], output
    assert "Traceback" not in output

    rescuer = start_worker(tmp_path, study_file, server.url, "--grace-period", "2")
    output = rescuer.communicate(timeout=300)[0]
    assert rescuer.returncode == 0, output
    study = optuna.load_study(study_name="giveup", storage=open_storage(server.url))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 1 and states[0] == TrialState.FAIL  # stale, then retried
    done = study.get_trials(states=(TrialState.COMPLETE,))[0]
    assert done.user_attrs["resumed_from"] >= 2, "the retry started over instead of resuming"
