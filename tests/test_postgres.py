"""Many workers on one study in the real PostgreSQL at 127.0.0.1:5432: no point finished twice."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search_helpers import POSTGRES_URL, points_finished, vadsearch, write_study

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def study_name(postgres):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=postgres)
    except KeyError:
        pass


def test_four_launched_workers_finish_each_point_exactly_once(tmp_path, tiny_csv, postgres, study_name):
    study_file = write_study(tmp_path / "pg.toml", name=study_name, data=tiny_csv,
                             search="hidden_size = [4, 8]\nlr = [0.001, 0.003, 0.01]\nbidirectional = [false, true]")
    result = vadsearch("launch", str(study_file), "--workers", "4", "--storage", POSTGRES_URL,
                       "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr + "".join(
        p.read_text() for p in (tmp_path / "vadsearch-logs").glob("*.log"))

    study = optuna.load_study(study_name=study_name, storage=postgres)
    finished = points_finished(study)
    assert len(finished) == 12 and set(finished.values()) == {1}
    # Not a terminal: the launch's progress is a line each time it changes, not a bar redrawn each second.
    progress = [line.split(" ", 2)[2] for line in result.stderr.splitlines() if "configurations done" in line]
    assert "\r" not in result.stderr and len(progress) >= 2
    assert all(a != b for a, b in zip(progress, progress[1:])), progress  # a line per change only
    assert progress[-1] == f"{study_name}: 12/12 configurations done, 0 running, 0 given up"
    workers = {t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(workers) > 1, "one worker did all the work: the others never joined"
    logs = [(tmp_path / "vadsearch-logs" / f"worker-{index}.log").read_text() for index in range(4)]
    assert not any("Traceback" in log or "Warning" in log for log in logs)
    # Each worker's log tells its trials epoch by epoch, in timestamped lines, not progress-bar redraws.
    assert not any("\r" in log for log in logs)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        line = (rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d INFO vadsearch\.worker: "
                rf"trial {trial.number}: epoch {trial.user_attrs['epochs_done']}/2  loss ")
        assert sum(bool(re.search(line, log, re.MULTILINE)) for log in logs) == 1
    # Optuna's own messages come in the same format as ours: one format in a worker's log.
    from_optuna = [line for log in logs for line in log.splitlines() if "finished with value" in line]
    assert len(from_optuna) == 12, logs
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO optuna\.", line) for line in from_optuna)

    # Stock Optuna tools read the same storage.
    optuna_cli = str(Path(sys.executable).with_name("optuna"))
    listed = subprocess.run([optuna_cli, "trials", "--study-name", study_name,
                             "--storage", POSTGRES_URL, "-f", "json"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count('"COMPLETE"') == 12
