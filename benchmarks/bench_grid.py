"""A whole study run end to end through `vadsearch launch`, timed from the command to its last trial.

    python benchmarks/bench_grid.py studies/bert.toml --workers 6 --random-base     # the report's BERT grid
    python benchmarks/bench_grid.py studies/lstm.toml --workers 8 --random-vectors   # the report's LSTM grid
    python benchmarks/bench_grid.py studies/bert.toml --workers 2 --random-base --small --data tiny.csv

`--random-base` trains a randomly initialised bert-base (the timing of bert-base-uncased, which this
machine may not be able to download). `--random-vectors` gives an LSTM study a stand-in 300-d vector file
instead of GloVe 6B 300d: the embedding layer has the vocabulary's rows and 300 columns either way, so
the timing is the same. Everything, including each worker's start-up, model loading and checkpoint
writes, is inside the wall time; storage and artifacts go to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import MINILM, REPO, random_encoder_dir  # noqa: E402

GLOVE_DIM = 300  # the LSTM grid's glove.6B.300d


def run(study: Path, workers: int, data: Path, device: str, sets: list[str], keep_dir: Path | None = None,
        launch_args: tuple[str, ...] = ()) -> dict:
    import optuna

    from vadsearch.report import gpu_peaks

    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    storage = f"sqlite:///{work / 'study.db'}"
    command = [sys.executable, "-m", "vadsearch.cli", "launch", str(study), "--workers", str(workers),
               "--storage", storage, "--artifacts", str(work / "artifacts"), "--log-dir", str(work / "logs"),
               "--data", str(data), "--device", device, *launch_args]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        logs = "".join(p.read_text()[-2000:] for p in sorted((work / "logs").glob("*.log")))
        raise RuntimeError(f"launch failed ({finished.returncode}):\n{finished.stderr[-2000:]}\n{logs}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    if keep_dir:
        shutil.copytree(work / "logs", keep_dir / "logs", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    row = {"wall_s": wall, "trials": len(trials), "complete": len(complete),
           "mean_trial_s": sum(durations) / max(1, len(durations)), "best_dev": min(t.value for t in complete)}
    peaks = gpu_peaks(trials)
    if peaks:  # on CUDA: the most memory one worker held, what --workers-per-gpu must fit
        row["peak_gpu_mib_max"] = max(peaks)
    return row


def random_vectors_file(dim: int = GLOVE_DIM) -> Path:
    """A GloVe-format file of one word: every other vocabulary word starts random, as GloVe's misses do."""
    folder = Path(tempfile.mkdtemp(prefix="bench-vectors-"))
    path = folder / f"random.{dim}d.txt"
    rng = random.Random(0)
    path.write_text("the " + " ".join(f"{rng.gauss(0, 0.1):.5f}" for _ in range(dim)) + "\n", encoding="utf-8")
    return path


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "emobank.csv")
    parser.add_argument("--model-name", help="the encoder to train (overrides the study's)")
    parser.add_argument("--random-base", action="store_true", help="a randomly initialised bert-base encoder")
    parser.add_argument("--small", action="store_true", help="with --random-base: a tiny encoder instead")
    parser.add_argument("--minilm", type=Path, default=MINILM, help="where --random-base takes its tokenizer")
    parser.add_argument("--random-vectors", action="store_true", help="a stand-in 300-d vector file for GloVe")
    parser.add_argument("--mps", action="store_true", help="launch the workers inside an NVIDIA MPS daemon")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE, as for launch")
    parser.add_argument("--keep-logs", type=Path, help="copy the workers' logs here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.small and not args.random_base:
        parser().error("--small makes --random-base's encoder tiny; without --random-base it changes nothing")
    if args.random_base and args.model_name:
        parser().error("--random-base and --model-name each name the encoder: give one")

    encoder = random_encoder_dir(args.small, args.minilm) if args.random_base else None
    vectors = random_vectors_file() if args.random_vectors else None
    sets = list(args.sets)
    if encoder or args.model_name:
        sets.append(f"model_name={encoder or args.model_name}")
    if vectors:
        sets.append(f"vectors={vectors}")
    try:
        row = run(args.study, args.workers, args.data, args.device, sets, args.keep_logs,
                  ("--mps",) if args.mps else ())
    finally:
        for made in (encoder, vectors and vectors.parent):
            if made:
                shutil.rmtree(made, ignore_errors=True)
    print(f"{args.study} x{args.workers} workers: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return row


if __name__ == "__main__":
    main()
