"""Directories that commands write into: made and checked before the work whose results go there."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from vadsearch.errors import OutputError, VadsearchError


def writable_dir(path: Path, what: str, error: type[VadsearchError] = OutputError, advice: str = "") -> Path:
    """Make `path` (and its parents) and check that a file can be written there; else one line saying
    why, as `error`. `what` names it for that line ("the log directory"); `advice` ends it."""
    path = Path(path)
    probe = path / f".probe-{os.getpid()}"
    try:
        if path.exists() and not path.is_dir():  # mkdir's own word for it is "File exists"
            raise error(f"{what} {path} is a file, not a directory; {advice or 'pass another directory'}")
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise error(f"cannot write to {what} {path}: {exc.strerror or exc}; {advice or 'pass another directory'}"
                    ) from None
    return path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write, renamed onto `path` when the block ends: a reader (another
    worker, a run after a crash) finds the old file or the new one, never one cut short. Named for this
    process, so concurrent writers never share one; removed, and the error passed on, if the block fails."""
    temporary = temporary_for(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def temporary_for(path: Path) -> Path:
    """`replacing`'s temporary file for `path`: hidden, and named for this process."""
    path = Path(path)
    return path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.name}.{os.getpid()}.tmp")
