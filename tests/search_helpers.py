"""Helpers for tests of studies and workers: tiny study files and storages on the tiny corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("VADSEARCH_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def write_study(path: Path, *, name: str, data: Path, search: str, study: str = "", **train) -> Path:
    """A grid study of a tiny LSTM on `data`; `search` and `study` add TOML lines, `train` overrides."""
    fixed = {"model": "lstm", "max_epochs": 2, "batch_size": 16, "embedding_dim": 8, "layers": 1, **train}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in fixed.items())
    path.write_text(
        f"""
[study]
name = "{name}"
sampler = "grid"
{study}

[data]
path = {json.dumps(str(data))}

[train]
{lines}

[search]
{search}
"""
    )
    return path


def vadsearch(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `vadsearch` entry point in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "vadsearch.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def points_finished(study) -> dict[str, int]:
    """How many COMPLETE trials each configuration has."""
    from optuna.trial import TrialState

    counts: dict[str, int] = {}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        counts[trial.user_attrs["point"]] = counts.get(trial.user_attrs["point"], 0) + 1
    return counts


def synchronous_checkpoints(monkeypatch) -> None:
    """Each epoch's checkpoint is on disk before training goes on, so it is reported at once.

    For tests that stop a run "right after epoch N": with writes on a thread, epoch N+1 may otherwise
    train (and be checkpointed) before epoch N's report, depending on timing.
    """
    from vadsearch.checkpoint import BackgroundWriter

    real = BackgroundWriter.save

    def save(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.wait()

    monkeypatch.setattr(BackgroundWriter, "save", save)
