"""`vadsearch launch`: N worker processes on this machine, spread over its GPUs, with one progress bar.

The workers are ordinary `vadsearch worker` processes: they coordinate through the study's storage
alone, exactly as workers on other machines do. This module only starts them, shows their combined
progress from the storage, and passes Ctrl-C on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    return max(1, (os.cpu_count() or 1) // workers)


def parse_gpus(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    gpus = tuple(g.strip() for g in text.split(",") if g.strip())
    if not all(g.isdigit() for g in gpus):
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


def wait(processes: list[subprocess.Popen], on_tick=None, tick: float = 1.0) -> list[int]:
    """Wait for every worker, calling `on_tick()` about once a `tick`; Ctrl-C is passed to the workers,
    which leave their running trials resumable."""
    try:
        while any(p.poll() is None for p in processes):
            if on_tick:
                on_tick()
            time.sleep(tick)
    except KeyboardInterrupt:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in processes:
            p.wait()
        raise
    finally:
        if on_tick:
            on_tick()
    return [p.returncode for p in processes]


def sort_exits(codes: list[int]) -> tuple[list[int], list[int]]:
    """(workers that failed, workers that stopped to leave an oversubscribed GPU to the others).

    The second kind is no failure: its trial was queued again, and the workers left finish the study."""
    gave_way = [i for i, code in enumerate(codes) if code == GpuMemoryError.exit_code]
    failed = [i for i, code in enumerate(codes) if code not in (0, GpuMemoryError.exit_code)]
    return failed, gave_way
