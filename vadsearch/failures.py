"""Why a trial failed, read from what its worker stored: one reading for retries and for reports.

A worker that catches the failure stores it with the trial's FAIL state (`worker.Worker._train_trial`):
`interrupted` (Ctrl-C, SIGTERM, or running when `vadsearch migrate` copied it), `machine_fault` with a
`fail_reason` (a checkpoint that could not be written, a GPU shared by too many workers ran out of
memory), or a `fail_reason` alone (the configuration raised). A FAIL trial with none of them was failed
by another worker because its heartbeat went stale: its own worker was killed or lost its machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INTERRUPTED = "interrupted"
MACHINE_FAULT = "machine fault"
ERROR = "error"
LOST = "worker lost"
MIGRATED = "migrated_running"  # set with `interrupted` on a trial that was RUNNING when its study was copied


def kind(attrs: Mapping[str, Any]) -> str:
    """One of INTERRUPTED, MACHINE_FAULT, ERROR (the configuration's own fault) or LOST."""
    if attrs.get("interrupted"):
        return INTERRUPTED
    if attrs.get("machine_fault"):
        return MACHINE_FAULT
    if "fail_reason" in attrs:
        return ERROR
    return LOST


def gave_way(attrs: Mapping[str, Any]) -> bool:
    """Whether the trial's worker stopped because the GPU it shared with other workers ran out of memory."""
    return kind(attrs) == MACHINE_FAULT and str(attrs.get("fail_reason", "")).startswith("GpuMemoryError")


def describe(attrs: Mapping[str, Any]) -> str:
    """The failure of a FAIL trial in words, for reports."""
    found = kind(attrs)
    if found == INTERRUPTED:
        # A retry is queued by the next worker to start or to look for work, so the words say what comes next.
        why = "running when its study was migrated" if attrs.get(MIGRATED) else "interrupted (Ctrl-C or SIGTERM)"
        return f"{why}: the next worker resumes it without spending a retry"
    if found == LOST:
        return f"worker {attrs.get('worker', '?')} stopped sending heartbeats (killed, or its machine was lost)"
    return str(attrs["fail_reason"])
