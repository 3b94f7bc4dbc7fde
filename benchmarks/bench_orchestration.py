"""Orchestration overhead: trials per second through a vadsearch worker against plain Optuna, with a
training function that does nothing, on the same storage.

    python benchmarks/bench_orchestration.py                       # SQLite in a temporary directory
    python benchmarks/bench_orchestration.py --storage postgresql+psycopg://postgres@127.0.0.1/test

The plain loop is `study.optimize` over the same enqueued grid, objective returning a constant, on a
storage with the same heartbeat settings as a worker's.
vadsearch adds what makes it resumable: queue reconciliation under a lock, heartbeats, per-trial
attributes. Both queues are filled before the clock starts, and each clock covers the trial loop alone; a
worker's start (connect, join the study, reconcile its queue) is printed beside it. The ratio is the
median over back-to-back pairs of runs. Target: at least 80% of plain Optuna's rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from unittest import mock

import optuna

REPO = Path(__file__).resolve().parents[1]


def plain_optuna(storage_url: str, points: int) -> float:
    # The same storage settings as a worker's: heartbeats on (each trial then records one on start).
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: used knowingly, as workers do
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=10, grace_period=60)
    study = optuna.create_study(study_name=f"plain-{uuid.uuid4().hex[:8]}", storage=storage)
    for seed in range(points):
        study.enqueue_trial({"seed": seed})
    started = time.perf_counter()
    study.optimize(lambda t: t.suggest_categorical("seed", list(range(points))) * 0.0, n_trials=points)
    rate = points / (time.perf_counter() - started)
    optuna.delete_study(study_name=study.study_name, storage=storage)
    return rate


def through_vadsearch(storage_url: str, points: int, data: Path, workdir: Path) -> tuple[float, float]:
    """(trials per second of the worker's trial loop, seconds it took to start: connect, join, reconcile)."""
    from vadsearch import worker as worker_module
    from vadsearch.results import RunResult, constant_baseline
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import Worker, WorkerOptions

    name = f"orch-{uuid.uuid4().hex[:8]}"
    study_file = workdir / f"{name}.toml"
    study_file.write_text(
        f'[study]\nname = "{name}"\n[data]\npath = "{data}"\n[train]\nmodel = "baseline"\n'
        f"[search]\nseed = {list(range(points))}\n"
    )
    corpus_scores = {}

    def does_nothing(config, corpus, **kwargs):  # the training function under test does no work
        if "dev" not in corpus_scores:
            corpus_scores.update(dev=constant_baseline(config, corpus).dev)
        return RunResult(config, best_epoch=0, dev=corpus_scores["dev"], test=None)

    options = WorkerOptions(storage=storage_url, artifacts=workdir / "art", device="cpu", progress=False)
    spec = load_study_file(study_file)
    # Like the plain loop's, the queue is filled before the clock starts: a first worker creates the study
    # and queues the grid, runs no trial; the timed one joins it as every later worker does.
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()
    worker = Worker(spec, options)
    worker.preflight()
    # The plain loop's clock covers `study.optimize`, not opening the storage or the study; this one covers
    # the worker's trial loop, and its start (once per worker, however long it runs) is reported beside it.
    loop = {}
    real_loop = Worker._loop

    def timed_loop(self, study, started):
        loop["started"] = time.perf_counter()
        try:
            return real_loop(self, study, started)
        finally:
            loop["seconds"] = time.perf_counter() - loop["started"]

    # The worker fits each trial's configuration through `fit`: that is the function replaced.
    with (mock.patch.object(worker_module, "fit", does_nothing), mock.patch.object(worker, "preflight"),
          mock.patch.object(Worker, "_loop", timed_loop)):
        started = time.perf_counter()
        summary = worker.run()
    assert summary.stopped == "finished" and len(summary.trials) == points
    optuna.delete_study(study_name=name, storage=optuna.storages.RDBStorage(storage_url))
    return len(summary.trials) / loop["seconds"], loop["started"] - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="database URL; default: a SQLite file in a temporary directory")
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "emobank.csv")
    parser.add_argument("--repeats", type=int, default=5,
                        help="pairs of runs (plain, then vadsearch); the ratio is the median of the pairs' ratios")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain, ours, starts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{tmp}/bench.db"
        for _ in range(args.repeats):  # in pairs, back to back, so that a busy spell on the machine hits both
            plain.append(plain_optuna(url, args.points))
            rate, start = through_vadsearch(url, args.points, args.data, Path(tmp))
            ours.append(rate)
            starts.append(start)
    ratios = sorted(o / p for p, o in zip(plain, ours))
    row = {"plain_trials_per_s": statistics.median(plain), "vadsearch_trials_per_s": statistics.median(ours),
           "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
           "worker_start_s": statistics.median(starts)}
    print("  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return row


if __name__ == "__main__":
    main()
