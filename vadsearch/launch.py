"""`vadsearch launch`: N worker processes on this machine, spread over its GPUs, with one progress bar.

The workers are ordinary `vadsearch worker` processes: they coordinate through the study's storage
alone, exactly as workers on other machines do. This module only starts them, shows their combined
progress from the storage, and passes Ctrl-C on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vadsearch import interrupts
from vadsearch.errors import ConfigError, GpuMemoryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    study_file: Path
    workers: int
    gpus: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()  # passed on to every `vadsearch worker`
    log_dir: Path = Path("vadsearch-logs")
    storage: str | None = None  # passed in the environment: a command line is readable by every local user
    env: tuple[tuple[str, str], ...] = ()  # more environment for every worker (an MPS daemon's pipes)
    renumbered: bool = False  # the workers see `gpus` as 0..n-1: an MPS daemon serving exactly those

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vadsearch.cli", "worker", str(self.study_file), *self.worker_args]

    def environment(self, index: int) -> dict[str, str]:
        env = {**os.environ, **dict(self.env)}
        # A share of the cores each: N workers each running a thread per core would spin against one
        # another on their CPU-side work (torchrun sets this too). A value the user set is kept.
        env.setdefault("OMP_NUM_THREADS", str(threads_per_worker(self.workers)))
        if self.storage:
            env["VADSEARCH_STORAGE"] = self.storage
        if self.gpus:
            slot = index % len(self.gpus)  # round-robin over the GPUs
            env["CUDA_VISIBLE_DEVICES"] = str(slot) if self.renumbered else self.gpus[slot]
        return env


def threads_per_worker(workers: int) -> int:
    return max(1, usable_cores() // workers)


def usable_cores() -> int:
    """The cores this process may run on: under Slurm, taskset or `docker --cpuset-cpus` fewer than the
    machine has, and counting those would oversubscribe them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_gpus(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    gpus = tuple(g.strip() for g in text.split(",") if g.strip())
    if not gpus or not all(re.fullmatch(r"[0-9]+", g) for g in gpus):  # str.isdigit takes "²"
        raise ConfigError(f"--gpus takes GPU indices separated by commas, like 0,1,2; got {text!r}")
    return gpus


def visible_devices(gpus: tuple[str, ...]) -> tuple[str, ...]:
    """`--gpus` indices as CUDA_VISIBLE_DEVICES entries for the workers.

    The indices count the GPUs this process sees, as CUDA's do: under a scheduler that set
    CUDA_VISIBLE_DEVICES=2,3, GPU 0 is the machine's GPU 2.
    """
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None or not gpus:
        return gpus
    seen = [d.strip() for d in inherited.split(",") if d.strip()]
    beyond = [g for g in gpus if int(g) >= len(seen)]
    if beyond:
        raise ConfigError(f"--gpus {','.join(beyond)}: this process sees {len(seen)} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={inherited!r}), numbered from 0")
    return tuple(seen[int(g)] for g in gpus)


def start(plan: LaunchPlan) -> list[subprocess.Popen]:
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(plan.workers):
        log_file = open(plan.log_dir / f"worker-{index}.log", "ab")
        processes.append(subprocess.Popen(plan.command(), env=plan.environment(index), stdout=log_file,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log_file.close()  # the child holds its own descriptor
    return processes


def wait(processes: list[subprocess.Popen], on_tick=None, tick: float = 1.0, on_exit=None) -> list[int]:
    """Wait for every worker, calling `on_tick()` about once a `tick` and `on_exit(index, code)` when a worker
    stops before the others; Ctrl-C is passed to the workers, which leave their running trials resumable."""
    reported: set[int] = set()
    try:
        while any(p.poll() is None for p in processes):
            interrupts.check()  # a Ctrl-C that a finalizer swallowed
            if on_exit:
                for index, p in enumerate(processes):
                    if p.returncode is not None and index not in reported:
                        reported.add(index)
                        on_exit(index, p.returncode)
            if on_tick:
                # It reads the study: a Ctrl-C raised inside that read kept SQLite's shared lock while the workers
                # stopped, and none could write its trial's interrupted state (interrupts.deferred).
                with interrupts.deferred():
                    on_tick()
            time.sleep(tick)
    except KeyboardInterrupt:
        _stop(processes)
        raise
    finally:
        if on_tick:
            on_tick()
    return [p.returncode for p in processes]


def _stop(processes: list[subprocess.Popen]) -> None:
    """Pass the stop on and wait for every worker. A later Ctrl-C (the user insisting while a worker writes
    its checkpoint or waits out the database) is passed on too: the launch never returns before its workers
    (an MPS daemon it started would be shut down under them)."""
    while True:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        try:
            for p in processes:
                p.wait()
            return
        except KeyboardInterrupt:
            continue


def stopped_from_outside(code: int) -> bool:
    """Killed by a signal, or stopped by SIGINT, SIGTERM or SIGHUP (a worker then exits 128 + its number
    itself): the worker's own work did not fail."""
    return code < 0 or code in (128 + s for s in interrupts.STOP_SIGNALS)


def sort_exits(codes: list[int]) -> tuple[list[int], list[int]]:
    """(workers that failed, workers that stopped to leave an oversubscribed GPU to the others).

    The second kind is no failure: its trial was queued again, and the workers left finish the study."""
    gave_way = [i for i, code in enumerate(codes) if code == GpuMemoryError.exit_code]
    failed = [i for i, code in enumerate(codes) if code not in (0, GpuMemoryError.exit_code)]
    return failed, gave_way


def describe_exits(codes: list[int], failed: list[int]) -> str:
    """`0 (exit code 1), 2 (killed by SIGKILL)`: a killed worker's log ends without a word of why, so saying
    only "exited with an error; see the logs" sent users to a log that does not tell."""
    return ", ".join(f"{i} ({exit_reason(codes[i])})" for i in failed)


def exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    if stopped_from_outside(code):
        return f"stopped by {signal.Signals(code - 128).name}"
    return f"exit code {code}"


def unfinished(study: str, settled: int, total: int, running: int, workers: int, gave_way: int,
               gpus: int) -> tuple[int, str] | None:
    """After `gave_way` of the launch's workers gave their GPU to the others and the rest stopped: None if
    the study is finished, else (exit code, what to say)."""
    if settled >= total:
        return None
    done = f"{study}: {settled}/{total} configurations done when the last worker here stopped"
    if running:
        # Workers elsewhere (another launch, another container) hold the card and go on with the study:
        # failing would only make a supervisor restart this launch into the same crowd.
        return 0, f"note: {done}; {running} trial(s) run on elsewhere (`vadsearch status` shows them)"
    per_gpu = max(1, workers // max(1, gpus))
    if per_gpu == 1:
        return 1, f"error: {done}; other processes fill the GPU: free it, then run the same command again"
    fitted = max(1, (workers - gave_way) // max(1, gpus))  # the workers that fit beside the others
    option = "--workers-per-gpu" if gpus else "--workers"  # --workers-per-gpu needs --gpus
    return 1, f"error: {done}; run it again with {option} {fitted} to finish the study"


AUTO_WORKERS_PER_GPU = 4  # before any trial of the study has recorded its peak memory
MAX_AUTO_WORKERS_PER_GPU = 16
CONTEXT_MIB = 512  # each process's CUDA context, beside what its allocator holds (gpumemory reads it here)


def parse_workers_per_gpu(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(f"--workers-per-gpu takes a number of workers (1 or more) or auto; got {text!r}")


# Run in a child process: the cards as the workers will see them (their CUDA_VISIBLE_DEVICES, CUDA's own
# numbering, a MIG slice at its own size), and the CUDA context it opens dies with it instead of holding
# memory in the launcher for the whole run.
MEMORY_PROBE = ("import torch\n"
                "for i in range(torch.cuda.device_count()):\n"
                "    print(torch.cuda.get_device_properties(i).total_memory)\n")


def gpu_memory_mib(gpus: tuple[str, ...] = ()) -> list[int]:
    """The memory of each of `gpus` (CUDA_VISIBLE_DEVICES entries; none: every visible GPU) in MiB, as CUDA
    sees them; as many sizes as CUDA finds of them."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}
    try:
        shown = subprocess.run([sys.executable, "-c", MEMORY_PROBE], env=env, capture_output=True, text=True,
                               timeout=300, check=True).stdout
        return [int(value) // 2**20 for value in shown.split()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ConfigError(f"cannot read the GPUs through CUDA ({type(exc).__name__}): check the driver, or give "
                          "--workers-per-gpu a number and run without --gpus to see what the workers say") from None


def check_gpus(gpus: tuple[str, ...]) -> list[int]:
    """The memory (MiB) of each of `gpus`, once CUDA is seen to have them all: workers given a GPU that is
    not there would train on the CPU instead, for days, without a word."""
    sizes = gpu_memory_mib(gpus)
    if len(sizes) < len(gpus):
        why = "run nvidia-smi to see why" if sizes else "no CUDA GPU at all: drop --gpus and pass --device cpu"
        raise ConfigError(f"--gpus {','.join(gpus)}: CUDA sees {len(sizes)} of these {len(gpus)} GPU(s) here ({why})")
    return sizes


def recorded_peaks(url: str, study_name: str) -> list[float]:
    """The peak GPU memory (MiB) of the study's finished trials; none for a new study."""
    import optuna

    from vadsearch.errors import StorageError
    from vadsearch.report import gpu_peaks
    from vadsearch.storage import open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url, create=False))
    except (StorageError, KeyError):  # no database or no study yet (or none reachable: the workers will say so)
        return []
    return gpu_peaks(study.get_trials(deepcopy=False))


def auto_workers_per_gpu(card_mib: int, peaks: list[float]) -> tuple[int, str]:
    """How many workers a card takes, from the most memory a trial of the study has needed, with a
    tenth to spare; and why, in words for the launch's output."""
    if not peaks:
        return AUTO_WORKERS_PER_GPU, ("no trial of this study has recorded its GPU memory yet; a worker that runs "
                                      "out of memory on a full card stops and leaves its trial to the others")
    need = max(peaks) * 1.1 + CONTEXT_MIB
    count = max(1, min(MAX_AUTO_WORKERS_PER_GPU, int(card_mib // need)))
    return count, f"GPUs of {card_mib:,} MiB; a trial of this study peaked at {max(peaks):,.0f} MiB"
