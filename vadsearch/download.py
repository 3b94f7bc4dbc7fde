"""Verified downloads into the cache: the EmoBank corpus, word vectors."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from vadsearch.errors import VadsearchError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 30
_CHUNK_BYTES = 1024 * 1024


class DownloadError(VadsearchError):
    """A download failed or did not match its checksum; callers re-raise it as their own error type."""


def download_verified(url: str, dest: Path, sha256: str, *, label: str, hint: str) -> Path:
    """Download `url` to `dest`, verifying its sha256; return `dest`.

    The bytes go to a temporary file beside `dest` that is renamed into place only once the checksum
    matches, so an interrupted or corrupt download never leaves a file that a later run would trust.
    `hint` tells the user how to do without the download.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(
            f"cannot write to {dest.parent}: {e.strerror or e}; set VADSEARCH_CACHE to a writable "
            f"directory, or {hint}"
        ) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out, label, hint)
        if actual != sha256:
            raise DownloadError(
                f"the file downloaded from {url} has sha256 {actual}, expected {sha256}; "
                f"it was discarded. Try again later, or {hint}"
            )
        os.replace(tmp, dest)
        log.info("saved %s to %s (sha256 verified)", label, dest)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful rename
    return dest


def _fetch(url: str, out: BinaryIO, label: str, hint: str) -> str:
    """Stream `url` into `out` with a progress bar on stderr; return the sha256 of what was written."""
    from tqdm import tqdm  # lazy: only a download needs it

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # The log says what is fetched; the bar is for terminals (a worker's log would get its redraws).
            log.info("downloading %s%s from %s", label, f" ({total / 1e6:.1f} MB)" if total else "", url)
            with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, disable=None) as bar:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as e:
        raise DownloadError(f"downloading {url} failed ({_network_reason(e)}); {hint}") from e
    except OSError as e:  # writing the temporary file: disk full, quota, ...
        raise DownloadError(f"cannot save the download: {e.strerror or e}; {hint}") from e
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def _network_reason(error: Exception) -> str:
    """A short cause: 'HTTP Error 404: Not Found', 'Name or service not known', or the error's type."""
    if isinstance(error, urllib.error.HTTPError):
        return str(error)
    return str(getattr(error, "reason", None) or error) or type(error).__name__
