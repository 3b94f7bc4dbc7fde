"""Training speed against the plain reference loop (reference.py), measured in one run on one device.

    python benchmarks/bench_train.py --device cuda --workers 8 --quality --graphs     # on a GPU
    python benchmarks/bench_train.py --device cpu --small                               # a smoke run (CI)

Rows, each a ratio against the reference loop measured in the same run:
  bert, lstm        one trial: seconds of a warm epoch (the 2nd of each loop), reference vs vadsearch
  bert xN, lstm xN  N trials at once on the device: aggregate epochs per minute in steady state (over
                    the span in which every worker is past its first epoch; `overlapped 0`: there was
                    none, and the rate is the whole span's, a lower bound), peak memory reserved per
                    worker, and the most device memory in use at once (this process's own CUDA context
                    included) (with --mps, the "... mps" rows again inside an NVIDIA MPS daemon, as
                    `vadsearch launch --mps` runs them)
  grids             the report's grids projected from those rates: BERT 6x9 epochs, LSTM 72x9 epochs
  quality           pretrained MiniLM, 3 epochs: best dev of vadsearch's loop vs the reference loop;
                    `within_target 0` (and exit status 1) when they differ by more than 0.002
  bert graphs ...   the BERT rows (and quality) again with the step replayed from CUDA graphs
                    (VADSEARCH_CUDA_GRAPHS=1), against the same reference: CUDA only
  compile           torch.compile on the one-trial BERT run: its first epoch (compiling) and a warm one

Random weights are fine for timing (same shapes). Absolute seconds on shared machines are noise; ratios
within one run are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import MINILM, REPO, random_encoder_dir, reference_run  # noqa: E402

BERT_GRID_EPOCHS = 6 * 9
LSTM_GRID_EPOCHS = 72 * 9
GRIDS = {"bert": ("bert_6x9_min", BERT_GRID_EPOCHS), "lstm": ("lstm_72x9_min", LSTM_GRID_EPOCHS)}
QUALITY_TOLERANCE = 0.002  # best dev MSE, fast path vs reference loop
MODELS = ("bert", "lstm")


def bench_corpus(data: Path, small: bool):
    from vadsearch.data import load_emobank

    corpus = load_emobank(data)
    return corpus.subset(256, 64, 64) if small else corpus


def fast_epochs(config, corpus, device: str) -> tuple[float, float, int]:
    """(seconds of the last epoch, best dev MSE, peak GPU bytes) through vadsearch's own loop."""
    from vadsearch.train import train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(config, corpus, device=device)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return result.history[-1].seconds, result.dev.mse, peak


def compile_models(mode: str) -> None:
    """Make every model train() builds a torch.compile'd one (measured here before the loop adopts it)."""
    import vadsearch.models as models

    build = models.build_model
    models.build_model = lambda *a, **k: torch.compile(build(*a, **k), mode=None if mode == "default" else mode)


def child(spec: dict) -> dict:
    """One trial in its own process, recording when each epoch ended and the device memory in use."""
    from vadsearch.config import TrainConfig
    from vadsearch.train import train

    if spec.get("compile"):
        compile_models(spec["compile"])
    corpus = bench_corpus(Path(spec["data"]), spec["small"])
    cuda = spec["device"].startswith("cuda")
    ends, used = [], []

    def on_epoch(_):
        ends.append(time.time())
        if cuda:
            free, total = torch.cuda.mem_get_info()  # every process's use of the device
            used.append(total - free)

    with step_warnings() as warnings:
        result = train(TrainConfig.from_dict(spec["config"]), corpus, device=spec["device"], on_epoch=on_epoch)
    return {"epoch_ends": ends, "epoch_seconds": [h.seconds for h in result.history], "step_warnings": warnings,
            "peak_reserved": torch.cuda.max_memory_reserved() if cuda else 0,
            "device_used": max(used, default=0), "best_dev": result.dev.mse}


def run_children(args, config, workers: int, compile_mode: str | None = None, timeout: float | None = None,
                 mps: bool = False):
    spec = {"config": config.to_dict(), "data": str(args.data), "small": args.small, "device": args.device,
            "compile": compile_mode}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    from vadsearch.launch import threads_per_worker

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_worker(workers)))}
    with contextlib.ExitStack() as stack:
        if mps:
            from vadsearch.mps import mps_daemon

            daemon_env, _ = stack.enter_context(mps_daemon((), Path(tempfile.mkdtemp(prefix="bench-mps-"))))
            env.update(daemon_env)
        return _collect(command, env, workers, timeout)


def _collect(command: list[str], env: dict, workers: int, timeout: float | None) -> list[dict]:
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                  env=env) for _ in range(workers)]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()  # a run past its time must not keep the device busy for the rows after it
                p.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"a benchmark worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def aggregate_rate(epoch_ends: list[list[float]]) -> tuple[float, bool]:
    """(epochs per second of all workers together, whether they overlapped in steady state).

    Counted over the span in which every worker is past its first epoch (compilation, caches) and none has
    finished: each worker's progress through it is read off its epoch ends, between them linearly. Adding
    up each worker's rate over its own span instead counts a worker that ran alone as if it ran beside the
    others. Without such a span, the epochs after each one's first over the whole span: a lower bound."""
    import numpy as np

    start, stop = max(ends[0] for ends in epoch_ends), min(ends[-1] for ends in epoch_ends)
    if stop > start:
        done = sum(np.interp(stop, ends, np.arange(len(ends))) - np.interp(start, ends, np.arange(len(ends)))
                   for ends in epoch_ends)
        return float(done) / (stop - start), True
    first, last = min(ends[0] for ends in epoch_ends), max(ends[-1] for ends in epoch_ends)
    return sum(len(ends) - 1 for ends in epoch_ends) / (last - first), False


def concurrent(args, config, workers: int, reference_s: float, mps: bool = False) -> dict:
    """N trials started together: their aggregate steady-state rate (see `aggregate_rate`)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process's cached blocks would count as the workers' memory in use
    results = run_children(args, config.replace(max_epochs=args.epochs_per_worker), workers, mps=mps)
    rate, overlapped = aggregate_rate([r["epoch_ends"] for r in results])
    if not overlapped:
        print(f"{config.model} x{workers}: the workers never all ran past their first epoch together; the rate is "
              "a lower bound (more --epochs-per-worker)", file=sys.stderr)
    per_minute = 60 * rate
    return {"finished": len(results), "epochs_per_min": per_minute, "vs_reference": per_minute * reference_s / 60,
            "peak_mib_per_worker": max(r["peak_reserved"] for r in results) / 2**20,
            "device_used_gib": max(r["device_used"] for r in results) / 2**30, "overlapped": float(overlapped),
            "fell_back_to_eager": float(sum(bool(r["step_warnings"]) for r in results))}  # workers, of n


def compiled(args, config, mode: str, eager: dict) -> dict:
    """torch.compile in `mode` against `eager`, each in a fresh process: the first epoch (compiling) and a
    warm one. `reduce-overhead` also captures CUDA graphs, one per batch shape."""
    try:
        (result,) = run_children(args, config.replace(max_epochs=2), 1, mode, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        print(f"compile {mode}: no figure, still running after {args.compile_timeout:.0f} s", file=sys.stderr)
        return {"timed_out_s": args.compile_timeout}
    except RuntimeError as exc:
        print(f"compile {mode}: no figure, {exc}", file=sys.stderr)
        return {"failed": 1.0}
    first, warm = result["epoch_seconds"]
    eager_first, eager_warm = eager["epoch_seconds"]
    gain = eager_warm - warm
    return {"first_epoch_s": first, "warm_s": warm, "eager_first_s": eager_first, "eager_warm_s": eager_warm,
            "speedup": eager_warm / warm,
            # Epochs of a trial after which compiling has paid for itself (inf: it never does).
            "break_even_epochs": (first - eager_first) / gain if gain > 0 else math.inf}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny models and a data subset: a smoke run")
    parser.add_argument("--workers", type=int, default=None, help="BERT trials at once (default 8; 2 with --small)")
    parser.add_argument("--lstm-workers", type=int, default=None, help="LSTM trials at once (default: --workers)")
    parser.add_argument("--models", default="bert,lstm", help="which models' rows to measure")
    parser.add_argument("--epochs-per-worker", type=int, default=3,
                        help="epochs each concurrent trial runs (at least 2: the first is not steady state)")
    parser.add_argument("--quality", action="store_true", help="MiniLM: fast vs reference best dev, 3 epochs")
    parser.add_argument("--graphs", action="store_true", help="also the BERT rows with CUDA graphs (CUDA only)")
    parser.add_argument("--mps", action="store_true", help="the concurrent rows again inside an NVIDIA MPS daemon")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the BERT trial")
    parser.add_argument("--compile-only", action="store_true", help="only the torch.compile row")
    parser.add_argument("--compile-modes", default="default", help="torch.compile modes, e.g. default,reduce-overhead")
    parser.add_argument("--compile-timeout", type=float, default=240.0, help="seconds allowed per compiled run")
    parser.add_argument("--minilm", type=Path, default=MINILM, help="the pretrained MiniLM (tokenizer and --quality)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "emobank.csv")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    check(args)
    workers = args.workers if args.workers is not None else (2 if args.small else 8)
    lstm_workers = args.lstm_workers if args.lstm_workers is not None else workers

    from vadsearch.config import TrainConfig

    corpus = bench_corpus(args.data, args.small)
    device = torch.device(args.device)
    encoder = random_encoder_dir(args.small, args.minilm)
    bert = TrainConfig(model="bert", model_name=str(encoder), max_epochs=2, batch_size=32, lr=3e-5, optimizer="adamw")
    lstm = TrainConfig(model="lstm", max_epochs=2, batch_size=32, hidden_size=64 if args.small else 500,
                       layers=1 if args.small else 3, bidirectional=True, embedding_dim=300)
    rows: dict[str, dict[str, float]] = {}
    try:
        if not args.compile_only:
            with cuda_graphs(False):  # the plain rows: graphs get rows of their own
                measure(args, corpus, device, bert, lstm, workers, lstm_workers, rows)
        if args.compile or args.compile_only:
            (eager,) = run_children(args, bert.replace(max_epochs=2), 1)
            for mode in args.compile_modes.split(","):
                rows[f"compile {mode}"] = compiled(args, bert, mode, eager)
                _emit(rows, args)
    finally:
        shutil.rmtree(encoder, ignore_errors=True)
    _emit(rows, args)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for name, values in rows.items():
        print(name.ljust(24) + "  ".join(f"{k} {v:.4f}" if abs(v) < 1 else f"{k} {v:.3f}" for k, v in values.items()))
    for line in failed_guards(rows):
        print(f"quality guard failed: {line}", file=sys.stderr)
    return rows


def check(args) -> None:
    """Flags that would measure nothing, or fail after minutes of measuring: refused before any."""
    models = args.models.split(",")
    problem = None
    if not models or any(m not in MODELS for m in models):
        problem = f"--models takes bert, lstm or bert,lstm; got {args.models!r}"
    elif args.epochs_per_worker < 2:
        problem = (f"--epochs-per-worker must be at least 2 (the first epoch is not steady state); "
                   f"got {args.epochs_per_worker}")
    elif args.quality and not args.minilm.is_dir():
        problem = f"--quality needs the pretrained MiniLM; {args.minilm} is not a directory (--minilm PATH)"
    elif args.mps and not args.device.startswith("cuda"):
        problem = f"--mps shares a CUDA GPU; --device {args.device} is none"
    if problem:
        parser().error(problem)


def measure(args, corpus, device, bert, lstm, workers: int, lstm_workers: int, rows: dict) -> None:
    references = {}
    for name, config, n in (("bert", bert, workers), ("lstm", lstm, lstm_workers)):
        if name not in args.models.split(","):
            continue
        # Two epochs, the 2nd timed, as the fast path's: the 1st pays CUDA's lazy loading and the allocator's
        # growth, which no later epoch of a trial pays again.
        references[name], _ = reference_run(config.replace(max_epochs=2), corpus, device)
        measure_fast(args, corpus, name, config, n, references[name], rows)
        if f"{name} x{n}" in rows:  # each model's own: a run of one model still projects its grid
            grid, epochs = GRIDS[name]
            rows.setdefault("grids", {})[grid] = epochs / rows[f"{name} x{n}"]["epochs_per_min"]
    minilm = bert.replace(model_name=str(args.minilm), max_epochs=3, lr=5e-5)
    if args.quality:
        _, references["quality"] = reference_run(minilm, corpus, device)
        rows["quality"] = quality(args, corpus, minilm, references["quality"])
    _emit(rows, args)
    if args.graphs and "bert" in references:
        if device.type != "cuda":
            print("bert graphs: no figure, CUDA graphs need a CUDA device", file=sys.stderr)
            return
        with cuda_graphs(True):
            measure_fast(args, corpus, "bert graphs", bert, workers, references["bert"], rows)
            together = rows.get(f"bert graphs x{workers}")
            if together:
                rows["grids"] = {**rows.get("grids", {}),
                                 "bert_6x9_min_graphs": BERT_GRID_EPOCHS / together["epochs_per_min"]}
            if "quality" in references:
                rows["quality graphs"] = quality(args, corpus, minilm, references["quality"])
        _emit(rows, args)


def measure_fast(args, corpus, name: str, config, n: int, reference_s: float, rows: dict) -> None:
    with step_warnings() as warnings:
        fast_s, _, peak = fast_epochs(config, corpus, args.device)  # the 2nd epoch: warm caches
    rows[name] = {"reference_s": reference_s, "fast_s": fast_s, "speedup": reference_s / fast_s,
                  "peak_gpu_mib": peak / 2**20}
    if warnings:  # a graphed row whose step fell back to eager: its figures are the eager step's
        rows[name]["fell_back_to_eager"] = 1.0
        print(f"{name}: {warnings[0]}", file=sys.stderr)
    if n:
        rows[f"{name} x{n}"] = concurrent(args, config, n, reference_s)
        _emit(rows, args)
        if args.mps:
            rows[f"{name} x{n} mps"] = concurrent(args, config, n, reference_s, mps=True)
    _emit(rows, args)


def quality(args, corpus, minilm, reference: float) -> dict:
    _, fast, _ = fast_epochs(minilm, corpus, args.device)
    difference = abs(fast - reference)
    return {"reference_best_dev": reference, "fast_best_dev": fast, "difference": difference,
            "within_target": float(difference <= QUALITY_TOLERANCE)}


def failed_guards(rows: dict) -> list[str]:
    """The quality rows off target: the benchmark's exit status says so, not only a figure in its table."""
    return [f"{name}: best dev {row['fast_best_dev']:.4f} against the reference's {row['reference_best_dev']:.4f}, "
            f"{row['difference']:.4f} apart (target {QUALITY_TOLERANCE})"
            for name, row in rows.items() if name.startswith("quality") and not row["within_target"]]


@contextlib.contextmanager
def step_warnings():
    """The warnings vadsearch.step logs meanwhile (a step that could not be captured)."""
    import logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("vadsearch.step")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def cuda_graphs(on: bool):
    """The training step replayed from CUDA graphs or not, here and in the worker processes started
    meanwhile, whatever VADSEARCH_CUDA_GRAPHS the benchmark itself was started with."""
    from vadsearch.step import GRAPHS_ENV

    return mock.patch.dict(os.environ, {GRAPHS_ENV: "1" if on else "0"})


def _emit(rows: dict, args) -> None:
    """Rows so far, to --json: a run cut short by a time limit still leaves what it measured."""
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(1 if failed_guards(main()) else 0)
