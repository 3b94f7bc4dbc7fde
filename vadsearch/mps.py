"""NVIDIA MPS for `vadsearch launch --mps`: the workers on one GPU run their kernels side by side.

Without MPS a GPU runs one process's kernels at a time, switching between processes in time slices. A
small trial's kernels fill a few of an H100's 132 multiprocessors each, so the other workers' kernels
wait for a GPU that is mostly idle. The MPS server funnels every worker's kernels into one context that
runs them at once.

A daemon the machine already runs is used as it is. Otherwise `launch` starts a private one for its
own workers, with its pipes in a temporary folder and its log beside the workers' logs, and stops it
when they are done, whatever way they end.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vadsearch.errors import ConfigError

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
SYSTEM_PIPES = Path("/tmp/nvidia-mps")  # where a daemon started without CUDA_MPS_PIPE_DIRECTORY listens
COMMAND_TIMEOUT_S = 60


def running_daemon() -> str | None:
    """Where the pipes of an MPS daemon already serving this user are, or None."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or str(SYSTEM_PIPES)
    return pipes if (Path(pipes) / "control").exists() else None


@contextmanager
def mps_daemon(gpus: tuple[str, ...], log_dir: Path) -> Iterator[tuple[dict[str, str], bool]]:
    """(the environment that connects a worker to an MPS daemon for `gpus`, whether it renumbers them).

    Starts a private daemon for `gpus` (CUDA_VISIBLE_DEVICES entries; all GPUs when empty) unless one
    is running, and quits it on the way out. A daemon started for some GPUs shows them to its clients
    as 0..n-1, so a worker then asks for GPU 1, not for the second of `gpus` by its own number.
    """
    control = shutil.which(CONTROL)
    if control is None:
        raise ConfigError(f"--mps needs {CONTROL} on the PATH (it comes with the NVIDIA driver); "
                          "leave out --mps to share the GPUs in time slices")
    existing = running_daemon()
    if existing:
        log.info("MPS: using the daemon already running at %s", existing)
        yield {"CUDA_MPS_PIPE_DIRECTORY": existing}, False
        return
    pipes = Path(tempfile.mkdtemp(prefix="vadsearch-mps-"))  # short: the pipes are Unix sockets
    logs = log_dir / "mps"
    logs.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    daemon_env = {**os.environ, **env}
    if gpus:
        daemon_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # the daemon serves these GPUs only
    try:
        _control(control, daemon_env, ["-d"], f"cannot start the MPS daemon (its log: {logs})")
    except BaseException:
        shutil.rmtree(pipes, ignore_errors=True)
        raise
    log.info("MPS: started a daemon for GPUs %s; its log is in %s", ",".join(gpus) or "all", logs)
    try:
        yield env, bool(gpus)
    finally:
        try:
            _control(control, daemon_env, [], "the MPS daemon did not quit", stdin="quit\n")
        except ConfigError as exc:
            log.warning("%s", exc)
        shutil.rmtree(pipes, ignore_errors=True)


def _control(control: str, env: dict[str, str], args: list[str], failure: str, stdin: str | None = None) -> None:
    try:
        done = subprocess.run([control, *args], env=env, input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{failure}: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[0]
        raise ConfigError(f"{failure}: {said}")
