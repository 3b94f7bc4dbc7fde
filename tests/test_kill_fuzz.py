"""Workers killed with SIGKILL again and again, inside the riskiest windows: while a checkpoint is half
written, while a finished trial's state is being stored, and at random moments of an epoch.

Afterwards every grid point is finished exactly once, every retry resumed from the last checkpoint its
predecessor reached, and (on CPU) each point's per-epoch dev scores are identical to those of an
uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import synthetic_rows, write_csv
from search_helpers import points_finished, write_study
from vadsearch.storage import open_storage

pytestmark = pytest.mark.slow

FAULT_WORKER = Path(__file__).parent / "faults" / "fault_worker.py"
KILLS = 12
WINDOWS = ("save", "finish", "epoch")  # targeted in turn


def run_worker(cwd: Path, study: Path, storage: str, artifacts: str, fault_dir: Path | None) -> subprocess.Popen:
    """A worker with its fault windows widened, or (no `fault_dir`) a plain one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    program = [str(FAULT_WORKER)] if fault_dir else ["-m", "vadsearch.cli"]
    if fault_dir:
        env["VADSEARCH_FAULT_DIR"] = str(fault_dir)
    return subprocess.Popen(
        [sys.executable, *program, "worker", str(study), "--storage", storage, "--artifacts", artifacts,
         "--device", "cpu", "-q", "--heartbeat-interval", "1", "--grace-period", "2"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def kill_inside(worker: subprocess.Popen, fault_dir: Path, window: str, rng: random.Random) -> str:
    """SIGKILL the worker inside `window` (or mid-epoch); return where it died, or '' if it finished first."""
    deadline = time.monotonic() + 60
    while worker.poll() is None and time.monotonic() < deadline:
        if window == "epoch":
            if any(fault_dir.glob("save-*")):  # training is under way: die somewhere in the next epoch
                time.sleep(rng.uniform(0.35, 0.9))
                break
        elif any(fault_dir.glob(f"{window}-*")):
            break
        time.sleep(0.01)
    if worker.poll() is not None:
        return ""
    open_windows = sorted(p.name.split("-")[0] for p in fault_dir.glob("*-*"))
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    for marker in fault_dir.glob("*-*"):
        marker.unlink()
    return open_windows[0] if open_windows else "epoch"


@pytest.fixture
def spawned():
    """Processes a test leaves running, if it fails before waiting for them: killed at its end."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_many_kills_lose_nothing_and_run_nothing_twice(tmp_path, spawned):
    corpus = write_csv(tmp_path / "corpus.csv", synthetic_rows(1500, 100, 100, seed=4))
    # Enough work (6 points x 6 epochs) that the study is still open when the last kill lands.
    study_file = write_study(tmp_path / "fuzz.toml", name="fuzz", data=corpus, max_epochs=6,
                             search="hidden_size = [8, 16, 24]\nlr = [0.001, 0.01]", study="max_retries = 0")
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    storage = f"sqlite:///{tmp_path}/fuzz.db"
    rng = random.Random(0)
    # The same grid, uninterrupted, in its own database, alongside (one thread each): the scores to match.
    reference = run_worker(tmp_path, study_file, f"sqlite:///{tmp_path}/ref.db", "ref-art", None)
    spawned.append(reference)

    died_in = Counter()
    attempts = 0
    while sum(died_in.values()) < KILLS and attempts < 3 * KILLS:
        window = WINDOWS[attempts % len(WINDOWS)]
        attempts += 1
        where = kill_inside(run_worker(tmp_path, study_file, storage, "art", fault_dir), fault_dir, window, rng)
        if where:
            died_in[where] += 1
    final = run_worker(tmp_path, study_file, storage, "art", fault_dir)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output
    print(f"\nkills: {sum(died_in.values())} ({dict(died_in)}) in {attempts} worker starts")
    assert sum(died_in.values()) >= KILLS
    assert died_in["save"] and died_in["finish"], "a targeted window was never hit"

    study = optuna.load_study(study_name="fuzz", storage=open_storage(storage))
    finished = points_finished(study)
    assert len(finished) == 6 and set(finished.values()) == {1}
    # max_retries = 0 and no trial ever failed by raising: every requeue came from a kill.
    assert not [t for t in study.trials if "fail_reason" in t.user_attrs]

    by_point = defaultdict(list)
    for trial in study.trials:
        if "point" in trial.user_attrs and not trial.user_attrs.get("orphan"):
            by_point[trial.user_attrs["point"]].append(trial)
    for trials in by_point.values():
        reached = 0  # epochs the killed predecessors had reported, hence checkpointed
        for trial in sorted(trials, key=lambda t: t.number):
            if "resumed_from" in trial.user_attrs:
                assert trial.user_attrs["resumed_from"] >= reached, "a retry went back before its checkpoint"
            reached = max([reached, *trial.intermediate_values])

    # Per-epoch dev scores must match the uninterrupted run's exactly.
    reference_output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, reference_output
    ref = optuna.load_study(study_name="fuzz", storage=open_storage(f"sqlite:///{tmp_path}/ref.db"))
    expected = {t.user_attrs["point"]: t.intermediate_values for t in ref.get_trials(states=(TrialState.COMPLETE,))}
    got = {t.user_attrs["point"]: t.intermediate_values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert got == expected
