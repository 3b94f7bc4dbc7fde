"""Stopping workers and launchers with signals, through the real processes: a Ctrl-C is never lost (even
one that lands in a finalizer), a second copy of it breaks nothing, and SIGTERM to `launch` stops its
workers instead of leaving them to run the study on their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import synthetic_rows, write_csv
from search_helpers import points_finished, write_study
from vadsearch import interrupts
from vadsearch.storage import open_storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_csv(tmp_path_factory) -> Path:
    # Large enough that an epoch takes a noticeable fraction of a second: a signal lands mid-trial.
    return write_csv(tmp_path_factory.mktemp("interrupts") / "corpus.csv", synthetic_rows(3000, 100, 100, seed=1))


@pytest.fixture
def spawned():
    """Processes (or pids) a test leaves running, if it fails before waiting for them: killed at its end."""
    processes: list = []
    yield processes
    for process in processes:
        pid = process if isinstance(process, int) else process.pid
        if isinstance(process, int) or process.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not isinstance(process, int):
                process.wait()


def popen(command: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    # Under a shell's `cmd &` SIGINT is ignored and stays ignored in children: start them with it handled.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(cwd: Path, pattern: str, count: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(cwd.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"nothing matched {pattern} in time"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def study_of(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{cwd}/vadsearch.db", create=False))


# A worker whose first epoch ends with a Ctrl-C landing inside a finalizer, where Python prints
# "Exception ignored in ..." and drops the KeyboardInterrupt (torch's weakref callbacks did this for real).
SWALLOWING_WORKER = textwrap.dedent("""
    import os, signal, sys
    import vadsearch.worker as worker

    real_fit = worker.fit

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the KeyboardInterrupt is raised in here, and dropped
                pass

    def fit(*args, on_epoch, **kwargs):
        def hook(epoch):
            on_epoch(epoch)
            if epoch.epoch == 1 and not epoch.restored:
                Finalizer()
        return real_fit(*args, on_epoch=hook, **kwargs)

    worker.fit = fit
    sys.argv = ["vadsearch", *sys.argv[1:]]
    from vadsearch.cli import main
    main()
""")


def test_a_ctrl_c_dropped_by_a_finalizer_still_stops_the_worker(tmp_path, slow_csv, spawned):
    study_file = write_study(tmp_path / "s.toml", name="swallow", data=slow_csv, max_epochs=4,
                             search="hidden_size = [8, 16]", embedding_dim=16)
    worker = popen([sys.executable, "-c", SWALLOWING_WORKER, "worker", str(study_file), "--device", "cpu", "-q"],
                   tmp_path)
    spawned.append(worker)
    output = worker.communicate(timeout=300)[0]
    # Before: the worker trained on to the end of the study (exit 0), and `launch` waited for it.
    assert worker.returncode == 130, output
    assert "interrupted: run the same command again to resume" in output
    trials = study_of(tmp_path, "swallow").trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["interrupted"] is True
    assert not any(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in trials)
    assert sorted(trials[0].intermediate_values) == [1]  # stopped between two steps of the next epoch, not later


def worker_in_its_first_trial(tmp_path: Path, data: Path, name: str, spawned: list) -> subprocess.Popen:
    """A `vadsearch worker` on a 2-point grid, once its first epoch checkpoint is on disk."""
    study_file = write_study(tmp_path / "s.toml", name=name, data=data, max_epochs=6,
                             search="hidden_size = [8, 16]", embedding_dim=16)
    worker = popen([sys.executable, "-m", "vadsearch.cli", "worker", str(study_file), "--device", "cpu", "-q"],
                   tmp_path)
    spawned.append(worker)
    wait_for(tmp_path, "vadsearch-artifacts/*/*/epoch-0001.pt")
    return worker


@pytest.mark.parametrize("gap", [0.01, 0.2])
def test_a_second_copy_of_ctrl_c_breaks_nothing(tmp_path, slow_csv, spawned, gap):
    # A terminal's Ctrl-C reaches `launch` and its workers, and `launch` passes it on again: each worker
    # gets it twice. Before: the copy landed in the worker's cleanup (a traceback and exit 1, or exit -2).
    worker = worker_in_its_first_trial(tmp_path, slow_csv, "twice", spawned)
    time.sleep(0.3)
    worker.send_signal(signal.SIGINT)
    time.sleep(gap)
    worker.send_signal(signal.SIGINT)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    study = study_of(tmp_path, "twice")
    assert [t.state for t in study.trials].count(TrialState.RUNNING) == 0
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].user_attrs["interrupted"] is True
    # Both points are queued again: the next worker finishes the study without waiting for anything stale.
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_sigterm_to_a_worker_queues_its_trial_again_at_once(tmp_path, slow_csv, spawned, signum):
    # systemd's stop, Slurm's time limit, `docker stop`; SIGHUP: the terminal closed, the ssh session dropped.
    # Before, the worker died at once and its trial stayed RUNNING until its heartbeat went stale.
    worker = worker_in_its_first_trial(tmp_path, slow_csv, "term1", spawned)
    worker.send_signal(signum)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 128 + signum, output
    assert f"stopped by {signum.name}: run the same command again to resume" in output and "Traceback" not in output
    study = study_of(tmp_path, "term1")
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].user_attrs["interrupted"] is True
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 2


def test_sigterm_to_launch_stops_its_workers_and_the_study_resumes(tmp_path, slow_csv, spawned):
    study_file = write_study(tmp_path / "s.toml", name="term", data=slow_csv, max_epochs=20,
                             search="hidden_size = [8, 16]", embedding_dim=16)
    command = [sys.executable, "-m", "vadsearch.cli", "launch", str(study_file), "--workers", "2", "--device", "cpu",
               "--keep", "study-best"]
    launch = popen(command, tmp_path)
    spawned.append(launch)
    # Both workers mid-trial: each run directory holds an epoch checkpoint (any: the newest two are kept, so
    # one epoch's is gone within a second or two of fast epochs).
    deadline = time.monotonic() + 120
    while len({p.parent for p in tmp_path.glob("vadsearch-artifacts/*/*/epoch-*.pt")}) < 2:
        assert time.monotonic() < deadline, "the two workers did not both start training in time"
        time.sleep(0.02)
    workers = [int(pid) for pid in Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split()]
    spawned.extend(workers)
    assert len(workers) == 2
    launch.send_signal(signal.SIGTERM)
    output = launch.communicate(timeout=120)[0]
    # Before: the launcher died at once (exit -15), and its workers went on with the study, orphaned.
    assert launch.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM: workers stopped; run the same command again to resume" in output
    assert not any(alive(pid) for pid in workers)
    study = study_of(tmp_path, "term")
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    assert all(t.user_attrs.get("interrupted") for t in study.trials if t.state == TrialState.FAIL)

    again = popen(command, tmp_path)
    spawned.append(again)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    finished = points_finished(study_of(tmp_path, "term"))
    assert len(finished) == 2 and set(finished.values()) == {1}
    # --keep study-best: the winner's weights alone, though both configurations were interrupted once.
    assert len(list(tmp_path.glob("vadsearch-artifacts/term/*/*.pt"))) == 1
    predicted = subprocess.run([sys.executable, "-m", "vadsearch.cli", "predict", "term", "a happy day"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr


def test_a_hang_up_that_nohup_ignores_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts.handled():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # the worker outlives its terminal
            assert signal.getsignal(signal.SIGTERM) == interrupts._handler
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with interrupts.handled():
            assert signal.getsignal(signal.SIGHUP) == interrupts._handler
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
