"""Epoch checkpoints: written atomically, rotated, verified before a run resumes from them.

A run directory holds `epoch-NNNN.pt` (everything needed to continue after epoch NNNN: model, optimizer,
scheduler, RNG states, history, the resolved config) and `best-NNNN.pt` (the weights of the best epoch so
far, with the config and vocabulary needed to use them). Files are written to a temporary name and
renamed, so a kill at any moment leaves either the old file or the new one. The two newest epoch
checkpoints and the best weights they name are kept, so that a torn or corrupt newest checkpoint falls
back to the one before it; a checkpoint that fails verification is renamed `*.rejected` and reported once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vadsearch.errors import CheckpointError, ConfigError
from vadsearch.outdir import replacing

if TYPE_CHECKING:
    import torch
# torch is imported where a checkpoint is read or written: `run_directory` and retention are used by
# workers that train nothing (the constant baseline), which then start without loading torch.

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2
_NAME = re.compile(r"^(epoch|best)-(\d{4,})\.pt$")
_TEMPORARY = re.compile(r"^\.(epoch|best)-\d{4,}\.pt\.\d+\.tmp$")  # see atomic_save
STALE_TEMPORARY_S = 15 * 60
"""A write takes seconds: a temporary file untouched this long belongs to a writer that was killed."""


def run_directory(root: str | Path, study_name: str, fingerprint: str) -> Path:
    """`root/<study name>/<fingerprint>`: where one configuration of a study keeps its checkpoints.

    Each part must be one plain path component, and the resolved directory must lie inside the resolved
    root (a symlink pointing out of it is refused too), so no name can make a worker write or delete
    files elsewhere. Study names are already checked by studyfile.py; this is the last check before a
    path reaches the disk. The path is returned unresolved, as the user wrote the root: it is stored on
    the trial, and workers on other machines may mount the root elsewhere.
    """
    for label, part in (("study name", study_name), ("configuration fingerprint", fingerprint)):
        if not isinstance(part, str) or part in ("", ".", "..") or any(c in part for c in "/\\\0"):
            raise ConfigError(f"{label} {part!r} cannot name a directory inside the artifact root")
    root = Path(root)
    path = root / study_name / fingerprint
    resolved_root, resolved = root.resolve(), path.resolve()
    if resolved == resolved_root or not resolved.is_relative_to(resolved_root):
        raise ConfigError(f"run directory {path} resolves outside the artifact root {resolved_root}; "
                          "remove the symlink or choose another --artifacts directory")
    return path


def atomic_save(obj: Any, path: Path) -> None:
    import torch

    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; "
            "free disk space or point the artifact directory at a writable place"
        ) from None


def _safe_load(path: Path) -> Any:
    # weights_only: a checkpoint file holds tensors and plain values and can never run code.
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


class RunDirectory:
    """The checkpoints of one training run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _files(self, kind: str) -> list[tuple[int, Path]]:
        if not self.path.is_dir():
            return []
        found = [(int(m[2]), p) for p in self.path.iterdir() if (m := _NAME.match(p.name)) and m[1] == kind]
        return sorted(found, reverse=True)

    def has_checkpoint(self) -> bool:
        """Whether an epoch checkpoint is here to resume from (read without loading torch)."""
        return bool(self._files("epoch"))

    def save(self, state: dict[str, Any], best_model: dict[str, torch.Tensor] | None, previous_best: int) -> None:
        """Write the checkpoint of `state["epoch"]`; `best_model` when this epoch is a new best.

        `previous_best` is the best epoch named by the checkpoint before this one: its weights stay for
        as long as that checkpoint may still be the fallback.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.path}: {exc.strerror or exc}; "
                "point the artifact directory at a writable place"
            ) from None
        epoch = state["epoch"]
        if best_model is not None:
            # Written before the epoch checkpoint that names it, so no checkpoint points at a missing file.
            # Self-sufficient: config and vocabulary travel with the weights, so the file alone can
            # predict or be exported after the epoch checkpoints are cleaned up.
            best = {k: state.get(k) for k in ("fingerprint", "data_sha256", "config", "vocab")}
            atomic_save({**best, "format": FORMAT, "epoch": epoch, "model": best_model},
                        self.path / f"best-{epoch:04d}.pt")
        atomic_save({**state, "format": FORMAT}, self.path / f"epoch-{epoch:04d}.pt")
        for _, old in self._files("epoch")[KEEP:]:
            old.unlink(missing_ok=True)
        for number, old in self._files("best"):
            if number not in (state["best_epoch"], previous_best):
                old.unlink(missing_ok=True)

    def load(self, fingerprint: str, data_sha256: str,
             explain: Callable[[Any], str] | None = None) -> dict[str, Any] | None:
        """The newest checkpoint that verifies, with its best weights under `"best_model"`; else None.
        `explain(config)` says how a rejected checkpoint's configuration differs from the one asked for."""
        self.sweep_temporaries()  # a run starts or resumes here: after a kill, if there was one
        rejected: dict[str, list[str]] = {}  # reason -> files: another run's two files are one warning
        for _, path in self._files("epoch"):
            try:
                state = _safe_load(path)
                problem = _mismatch(state, fingerprint, data_sha256, explain)
                if problem is None:
                    best = _safe_load(self.path / f"best-{state['best_epoch']:04d}.pt")
                    problem = None if best.get("fingerprint") == fingerprint else "its best weights belong to another run"
            except Exception as exc:  # torn, truncated or random bytes: anything unpicklable
                problem = f"unreadable ({type(exc).__name__})"
            if problem is None:
                self._say_rejected(rejected, f"resuming from {path.name}")
                return {**state, "best_model": best["model"]}
            rejected.setdefault(problem, []).append(path.name)
            self._set_aside(path)
        self._say_rejected(rejected, "starting over")
        return None

    def _say_rejected(self, rejected: dict[str, list[str]], then: str) -> None:
        for problem, names in rejected.items():
            log.warning("checkpoint%s %s in %s rejected: %s; %s", "s" if len(names) > 1 else "", ", ".join(names),
                        self.path, problem, then)

    def sweep_temporaries(self, now: float | None = None) -> list[Path]:
        """Delete what killed writes left: a bert-base checkpoint's temporary file is over a gigabyte.
        Only files untouched for `STALE_TEMPORARY_S`, so that a write in flight elsewhere is left alone."""
        if not self.path.is_dir():
            return []
        cutoff = (time.time() if now is None else now) - STALE_TEMPORARY_S
        removed = []
        for path in self.path.iterdir():
            try:
                if _TEMPORARY.match(path.name) and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone already, or a read-only directory: harmless either way
                continue
        if removed:
            log.info("removed %d temporary file(s) of interrupted checkpoint writes in %s", len(removed), self.path)
        return removed

    def discard(self, reason: str) -> None:
        """Set every checkpoint aside (renamed `*.rejected`), so that training starts over cleanly."""
        files = self._files("epoch") + self._files("best")
        if files:
            log.warning("checkpoints in %s set aside: %s", self.path, reason)
        for _, path in files:
            self._set_aside(path)

    @staticmethod
    def _set_aside(path: Path) -> None:
        try:
            path.replace(path.with_name(path.name + ".rejected"))
        except OSError:
            # A read-only directory: it stays in place and is rejected again next time, which is
            # harmless; the run itself will fail clearly when it tries to write its first checkpoint.
            pass

    def best_model(self, epoch: int) -> dict[str, torch.Tensor]:
        return _safe_load(self.path / f"best-{epoch:04d}.pt")["model"]

    def best(self, epoch: int | None = None) -> dict[str, Any] | None:
        """The best-weights file (model, config, vocab, epoch) of `epoch` when it exists, else the
        newest one; None when there is none."""
        if epoch is not None and (self.path / f"best-{epoch:04d}.pt").is_file():
            return _safe_load(self.path / f"best-{epoch:04d}.pt")
        files = self._files("best")
        return _safe_load(files[0][1]) if files else None

    def remove(self, kind: str, keep_newest: int = 0) -> list[Path]:
        """Delete the `epoch` (resume state) or `best` (weights) files of the run but the `keep_newest`
        newest; return what went."""
        removed = []
        for _, path in self._files(kind)[keep_newest:]:
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed


class BackgroundWriter:
    """Writes a run's checkpoints on a thread, one at a time, so that training goes on meanwhile.

    A bert-base checkpoint with its optimizer state is 1.3 GB, and flushing it to disk takes seconds:
    as long as an epoch on a GPU. `save` copies the state to host memory first (training then changes
    the live tensors freely) and returns; `wait` blocks until the write in flight is on disk and raises
    its error, if any; `written` is the newest epoch on disk. A kill during a write leaves the previous
    checkpoint to resume from, as ever.
    """

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self.written = 0  # the newest epoch whose checkpoint is on disk
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any], best_model: dict[str, torch.Tensor] | None, previous_best: int) -> None:
        """As `RunDirectory.save`; `state` is copied here, `best_model` must be the caller's own snapshot."""
        self.wait()  # one write in flight at most: host memory holds one extra copy, never more
        state = host_copy(state)

        def write() -> None:
            try:
                self.run.save(state, best_model, previous_best)
                self.written = state["epoch"]
            except BaseException as exc:  # re-raised in the training thread by wait() or check()
                self._error = exc

        # Not a daemon: a process that is exiting still finishes the checkpoint it started.
        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a write that failed, without waiting for one in flight."""
        if self._error is not None and self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to the CPU: a snapshot that later training steps cannot change."""
    import torch

    def copy(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.detach().to("cpu", copy=True)
        if isinstance(obj, dict):
            return {k: copy(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(copy(v) for v in obj)
        return obj

    return copy(obj)


def _mismatch(state: Any, fingerprint: str, data_sha256: str,
              explain: Callable[[Any], str] | None = None) -> str | None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return "not a vadsearch checkpoint"
    if state.get("fingerprint") != fingerprint:
        differences = explain(state.get("config")) if explain else ""
        return "it belongs to another configuration" + (f" ({differences})" if differences else "")
    if state.get("data_sha256") != data_sha256:
        return "it was trained on other data"
    return None
