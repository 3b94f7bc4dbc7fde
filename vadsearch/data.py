"""The corpus: find, download, parse and validate EmoBank-format CSV files.

Any CSV with the columns ``id, split, V, A, D, text`` works (extra columns are ignored, order is free),
so other corpora in this schema can be searched too. Every problem with a file becomes one `DataError`
line that names the file, the physical line and the column, because that is what a user needs to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vadsearch.download import DownloadError, download_verified
from vadsearch.errors import DataError

SPLITS = ("train", "dev", "test")
DIMENSIONS = ("V", "A", "D")
COLUMNS = ("id", "split", "V", "A", "D", "text")
EMOBANK_URL = "https://raw.githubusercontent.com/JULIELab/EmoBank/master/corpus/emobank.csv"
EMOBANK_SHA256 = "1ade4a4a453e880c0f39d0536d2b355e8a716e0cf88236c64cdb4d438cf9605b"

SCORE_RANGE = (1.0, 5.0)  # EmoBank's rating scale; V, A, D are averages of 1..5 ratings
_CHUNK_BYTES = 64 * 1024
_HOW_TO_PASS = "download it yourself and pass --data PATH or set VADSEARCH_DATA"


@dataclass(frozen=True, eq=False, repr=False)
class Split:
    """One split of the corpus, in file order.

    ``eq=False`` because comparing numpy arrays field-wise is ambiguous; compare ``ids`` instead.
    """

    name: str
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    targets: np.ndarray  # float64, shape (n, 3), columns V, A, D

    def __post_init__(self) -> None:
        targets = np.array(self.targets, dtype=np.float64).reshape(-1, len(DIMENSIONS))
        if not len(self.ids) == len(self.texts) == len(targets):
            raise ValueError(
                f"split {self.name!r}: {len(self.ids)} ids, {len(self.texts)} texts, "
                f"{len(targets)} target rows; they must match"
            )
        targets.flags.writeable = False  # the dataclass is frozen; so is its array
        object.__setattr__(self, "targets", targets)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Split(name={self.name!r}, n={len(self)})"

    def take(self, indices: np.ndarray) -> Split:
        """The rows at `indices`, in that order."""
        return Split(
            name=self.name,
            ids=tuple(self.ids[i] for i in indices),
            texts=tuple(self.texts[i] for i in indices),
            targets=self.targets[indices],
        )


@dataclass(frozen=True, eq=False, repr=False)
class Corpus:
    """A validated corpus file: its splits and the sha256 of its bytes (a cache key for features); for a
    subset, `sha256` keys the subset and `file_sha256` names the file it was drawn from."""

    path: Path
    sha256: str
    splits: dict[str, Split]
    file_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.file_sha256:
            object.__setattr__(self, "file_sha256", self.sha256)
        missing = [name for name in SPLITS if name not in self.splits]
        if missing:
            raise ValueError(f"corpus is missing splits {missing}; it needs {list(SPLITS)}")

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def dev(self) -> Split:
        return self.splits["dev"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(self.splits[name])}" for name in SPLITS)
        return f"Corpus(path={str(self.path)!r}, sha256={self.sha256[:12]!r}..., {sizes})"

    def subset(self, n_train: int, n_dev: int, n_test: int, seed: int = 0) -> Corpus:
        """A deterministic random subset for quick runs; rows keep their file order.

        Each split draws from its own generator, so changing `n_dev` does not change the training rows.
        A split smaller than asked for is kept whole. The sha256 changes with the arguments so that
        caches keyed on it never mix a subset with the full corpus.
        """
        sizes = {"train": n_train, "dev": n_dev, "test": n_test}
        for name, n in sizes.items():
            if n < (0 if name == "test" else 1):
                raise ValueError(f"n_{name} must be at least {0 if name == 'test' else 1}, got {n}")
        splits = {}
        for index, name in enumerate(SPLITS):
            split = self.splits[name]
            rng = np.random.default_rng([seed, index])
            chosen = np.sort(rng.permutation(len(split))[: sizes[name]])
            splits[name] = split.take(chosen)
        key = f"{self.sha256}:{n_train}:{n_dev}:{n_test}:{seed}"
        return Corpus(path=self.path, sha256=hashlib.sha256(key.encode()).hexdigest(), splits=splits,
                      file_sha256=self.file_sha256)


# ---------------------------------------------------------------------------------------------- finding


def cache_dir() -> Path:
    """Where downloads live: $VADSEARCH_CACHE, else $XDG_CACHE_HOME/vadsearch, else ~/.cache/vadsearch.

    The directory is not created here; only a download needs it to exist.
    """
    if os.environ.get("VADSEARCH_CACHE"):
        return user_path(os.environ["VADSEARCH_CACHE"], "VADSEARCH_CACHE")
    if os.environ.get("XDG_CACHE_HOME"):
        return user_path(os.environ["XDG_CACHE_HOME"], "XDG_CACHE_HOME") / "vadsearch"
    return Path.home() / ".cache" / "vadsearch"


def user_path(text: str | Path, what: str, error: type[Exception] = DataError) -> Path:
    """`text` with a leading ~ expanded; a ~user that does not exist (a typo: pathlib raises a bare
    RuntimeError for it) is one line naming `what`."""
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:
        raise error(f"{what} {str(text)!r} is not a usable path: {exc}") from None


def resolve_data_path(path: str | Path | None = None, *, download: bool = True) -> Path:
    """Find the corpus: explicit `path`, then $VADSEARCH_DATA, then the cache, then a download.

    An explicit path or variable that points nowhere is an error rather than a silent fall-through,
    because the user asked for that file and would otherwise get a different corpus without noticing.
    """
    if path is not None:
        explicit = user_path(path, "data file")
        if not _exists(explicit):
            raise DataError(f"data file {explicit} does not exist; check --data, or the study file's [data] path")
        return explicit
    if os.environ.get("VADSEARCH_DATA"):
        from_env = user_path(os.environ["VADSEARCH_DATA"], "VADSEARCH_DATA")
        if not _exists(from_env):
            raise DataError(
                f"VADSEARCH_DATA points to {from_env}, which does not exist; fix or unset the variable"
            )
        return from_env
    cached = cache_dir() / "emobank.csv"
    if cached.is_file():
        return cached
    if not download:
        raise DataError(
            f"no EmoBank file found (looked in {cached}); pass --data PATH, set VADSEARCH_DATA, "
            "or allow the download"
        )
    # Module globals read at call time, so tests (and mirrors) can swap them.
    return download_emobank(cached, url=EMOBANK_URL, sha256=EMOBANK_SHA256)


def described_file_sha256(description: dict) -> str | None:
    """The checksum of the data file a study ran on, from its stored description: for a subset its
    `file_sha256` (`data_sha256` keys the subset; studies stored before it was kept have none: None),
    else its `data_sha256`."""
    if description.get("data_subset"):
        return description.get("file_sha256")
    return description.get("file_sha256") or description.get("data_sha256")


def _exists(path: Path) -> bool:
    """Whether `path` exists; a path that cannot even be looked at (a directory without permission on the
    way, a name too long) is one line, not an OSError from deep in pathlib."""
    try:
        return path.exists()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_corpus(path: str | Path) -> Corpus:
    """Parse and validate one EmoBank-format CSV file."""
    path = Path(path)
    raw = _read_bytes(path)
    text = _decode(raw, path)
    return Corpus(path=path, sha256=hashlib.sha256(raw).hexdigest(), splits=_parse(text, path))


def load_emobank(path: str | Path | None = None, *, download: bool = True) -> Corpus:
    """Find (or download) the corpus and load it; see `resolve_data_path` for the search order. The
    cached copy is checked as a download is: a file put there by hand must not pass for EmoBank."""
    corpus = load_corpus(resolve_data_path(path, download=download))
    if path is None and not os.environ.get("VADSEARCH_DATA") and corpus.sha256 != EMOBANK_SHA256:
        raise DataError(f"{corpus.path} is not the published EmoBank file (sha256 {corpus.sha256[:12]}…): delete "
                        "it to download EmoBank again, or pass your own file with --data")
    return corpus


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- downloading


def download_emobank(dest: Path, url: str = EMOBANK_URL, sha256: str = EMOBANK_SHA256) -> Path:
    """Download the corpus to `dest`, verifying its sha256; return `dest`."""
    try:
        return download_verified(url, Path(dest), sha256, label="EmoBank", hint=_HOW_TO_PASS)
    except DownloadError as exc:
        raise DataError(str(exc)) from None


# --------------------------------------------------------------------------------- parsing and checking


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, or a DataError that says why they cannot be read."""
    if _exists(path) and not path.is_file():  # a FIFO or a device would be read for ever
        raise DataError(f"{path} is {'a directory' if path.is_dir() else 'not a regular file'}, not a CSV file")
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"data file {path} does not exist") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark is tolerated); the error names the first bad line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: the file is not UTF-8 (byte {raw[e.start]:#04x}); save it as UTF-8"
        ) from e


def csv_records(text: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, fields) per CSV record; blank lines are skipped.

    The line is where the record starts, which differs from `reader.line_num` (where it ends) when
    a quoted field spans lines.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field limit" in str(e):  # the usual cause: the rest of the file read as one quoted field
                raise DataError(f"{path}, line {start}: a field runs on past {csv.field_size_limit():,} characters; "
                                "is a quote opened on this line and never closed?") from e
            raise DataError(f"{path}, line {start}: malformed CSV ({e})") from e
        end = reader.line_num
        if fields:
            yield start, fields


def _column_index(header: list[str], path: Path, line: int) -> dict[str, int]:
    """Position of each required column; all missing ones are named at once."""
    names = [name.strip() for name in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        listed = ", ".join(f"'{c}'" for c in missing)
        raise DataError(
            f"{path}, line {line}: missing column{'s' if len(missing) > 1 else ''} {listed}; "
            f"the header must name {', '.join(COLUMNS)}"
        )
    repeated = [c for c in COLUMNS if names.count(c) > 1]
    if repeated:
        raise DataError(f"{path}, line {line}: column '{repeated[0]}' appears more than once in the header")
    return {c: names.index(c) for c in COLUMNS}


def _score(value: str, where: str) -> float:
    """One V/A/D value, finite and on the rating scale."""
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: {value!r} is not a finite number")
    low, high = SCORE_RANGE
    if not low <= number <= high:
        raise DataError(f"{where}: {value!r} is outside the rating range [{low:g}, {high:g}]")
    return number


def _parse(text: str, path: Path) -> dict[str, Split]:
    """Validate every row and group them by split, keeping file order."""
    records = csv_records(text, path)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path} is empty; expected a header {','.join(COLUMNS)} and data rows")
    header_line, header = first
    index = _column_index(header, path, header_line)
    rows: dict[str, list[_Row]] = {name: [] for name in SPLITS}
    first_seen: dict[str, int] = {}  # id -> line, to name both lines of a duplicate
    for line, fields in records:
        row = _check_row(fields, len(header), index, f"{path}, line {line}")
        if row.id in first_seen:
            raise DataError(
                f"{path}, line {line}, column 'id': duplicate id {row.id!r} "
                f"(first on line {first_seen[row.id]})"
            )
        first_seen[row.id] = line
        rows[row.split].append(row)
    if not first_seen:
        raise DataError(f"{path} has a header but no data rows")
    for required in ("train", "dev"):
        if not rows[required]:
            raise DataError(
                f"{path} has no rows with split '{required}'; train and dev rows are required "
                "(test may be empty)"
            )
    return {name: _to_split(name, split_rows) for name, split_rows in rows.items()}


@dataclass(frozen=True)
class _Row:
    id: str
    split: str
    text: str
    targets: tuple[float, float, float]


def _check_row(fields: list[str], n_fields: int, index: dict[str, int], where: str) -> _Row:
    """One data row, checked field by field; `where` is "file, line N" for the messages."""
    if len(fields) != n_fields:
        raise DataError(f"{where}: expected {n_fields} fields, found {len(fields)}")
    row_id = fields[index["id"]].strip()  # as the split is: "x " and "x" are one id, so a duplicate
    if not row_id:
        raise DataError(f"{where}, column 'id': the id is empty")
    split = fields[index["split"]].strip()
    if split not in SPLITS:
        allowed = ", ".join(f"'{s}'" for s in SPLITS)
        raise DataError(f"{where}, column 'split': unknown split {split!r}; allowed values are {allowed}")
    v, a, d = (_score(fields[index[dim]], f"{where}, column '{dim}'") for dim in DIMENSIONS)
    # The text stays verbatim: 'None', 'NA' and '"' are real sentences in EmoBank.
    return _Row(id=row_id, split=split, text=fields[index["text"]], targets=(v, a, d))


def _to_split(name: str, rows: list[_Row]) -> Split:
    return Split(
        name=name,
        ids=tuple(row.id for row in rows),
        texts=tuple(row.text for row in rows),
        targets=np.array([row.targets for row in rows], dtype=np.float64).reshape(-1, len(DIMENSIONS)),
    )
