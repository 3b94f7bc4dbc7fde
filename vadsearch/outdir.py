"""Directories that commands write into: made and checked before the work whose results go there."""

from __future__ import annotations

import os
from pathlib import Path

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
