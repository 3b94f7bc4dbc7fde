"""Bad input, property-based: any malformed study file or EmoBank-format CSV given to `vadsearch worker`
ends in exactly one line `error: …` that names the file (and the key or line to fix), exit code 2, no
traceback, and nothing written: no database file, no lock file, no artifact directory, and no new row
in a database that already exists.

Malformed inputs are random mutations of valid ones. Structured mutations (an unknown key, a value of
the wrong type, a value out of range, a bad cell, a duplicate id, …) must always be rejected. Mutations
of the raw text (random bytes, truncation, inserted or repeated lines) are sometimes still valid; those
are recognised with the library's own validation and skipped, so that no real search ever starts here.
The number of cases tried is printed at the end of the module (run with -s).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import logging
import math
import os
import re
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import synthetic_rows, write_csv
from vadsearch.cli import app
from vadsearch.config import MODELS, TrainConfig
from vadsearch.data import COLUMNS, DIMENSIONS, SPLITS, load_corpus
from vadsearch.errors import DataError, StudyFileError
from vadsearch.studyfile import PRUNERS, SAMPLERS, load_study_file

runner = CliRunner()
CASES: Counter[str] = Counter()
EXAMPLES = int(os.environ.get("VADSEARCH_PROPERTY_EXAMPLES", "250"))  # per test; the file runs in ~30 s on 2 cores
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- valid starting points -------------------------------------------------------------------------------
# Tiny LSTMs on a few sentences, whose searched options all matter: a mutation that slipped through would
# train for a second, and fail the test that expects it refused.
GRID = {
    "study": {"name": "prop", "description": "property-based test", "sampler": "grid", "max_retries": 1,
              "seed": 0},
    "data": {"subset": {"train": 10, "dev": 5, "test": 5}},
    "train": {"model": "lstm", "max_epochs": 2, "batch_size": 16, "lr": 0.001, "dropout": 0.1, "embedding_dim": 8},
    "search": {"hidden_size": [4, 8], "seed": [0, 1]},
}
TPE = {
    "study": {"name": "prop-tpe", "sampler": "tpe", "max_trials": 2, "seed": 0},
    "train": {"model": "lstm", "max_epochs": 3, "batch_size": 16, "embedding_dim": 8},
    "search": {"lr": {"low": 0.0001, "high": 0.01, "log": True}, "dropout": {"low": 0.0, "high": 0.5, "step": 0.1},
               "hidden_size": {"low": 4, "high": 16}},
    "pruner": {"kind": "median", "startup_trials": 1, "warmup_epochs": 1},
}
BASES = {"grid": GRID, "tpe": TPE}
GOOD_ROWS = synthetic_rows(12, 6, 6, seed=3)

_TRAIN_KEYS = {f for f in TrainConfig.__dataclass_fields__}
ALLOWED = {  # the keys each table may hold; anything else is an unknown key
    (): {"study", "data", "train", "search", "pruner"},
    ("study",): {"name", "description", "sampler", "max_trials", "max_retries", "seed"},
    ("data",): {"path", "subset"},
    ("data", "subset"): {"train", "dev", "test"},
    ("train",): _TRAIN_KEYS,
    ("search",): _TRAIN_KEYS,
    ("pruner",): {"kind", "startup_trials", "warmup_epochs"},
}
RANGE_KEYS = {"low", "high", "log", "step"}


# --- writing TOML (no TOML writer in the dependencies; this one covers what the tests generate) ----------
def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict) -> str:
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    for name, table in document.items():
        if isinstance(table, dict):
            lines.append(f"\n[{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# --- malformed study files -------------------------------------------------------------------------------
INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=20)
LISTS = st.lists(st.integers(-5, 5) | st.text(max_size=5), max_size=3)
TABLES = st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), st.integers(-3, 3), max_size=2)
OF_TYPE = {"int": INTS, "float": ANY_FLOAT, "str": TEXT, "bool": st.booleans(), "list": LISTS, "dict": TABLES}


def type_of(value) -> str:
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list)):
        if isinstance(value, kind):
            return name
    return "dict"


def wrong_types(path: tuple[str, ...], value) -> list[str]:
    """TOML types that `path` must never accept in place of `value`."""
    kind = type_of(value)
    wrong = [t for t in OF_TYPE if t != kind]
    if kind == "float":
        wrong.remove("int")  # an integer is a fine float (lr = 1)
    if kind == "dict" and path[:1] == ("search",):
        wrong.remove("list")  # a list of choices instead of a range is a valid axis
    return wrong


def leaves(document: dict, prefix: tuple[str, ...] = ()):
    """(path, value) of every key of the document, tables included."""
    for key, value in document.items():
        yield prefix + (key,), value
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))


def tables(document: dict, prefix: tuple[str, ...] = ()):
    yield prefix, document
    for key, value in document.items():
        if isinstance(value, dict):
            yield from tables(value, prefix + (key,))


def put(document: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def not_a_name(text: str) -> bool:
    return not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text)


def bad_values(base: str) -> dict[tuple[str, ...], st.SearchStrategy]:
    """Values of the right type but out of range, for keys of the `base` document."""
    negative = st.integers(min_value=-(2**63), max_value=-1)
    common = {
        ("study", "sampler"): TEXT.filter(lambda s: s not in SAMPLERS),
        ("study", "name"): TEXT.filter(not_a_name),
        ("study", "max_trials"): st.integers(min_value=-(2**63), max_value=0),
        ("study", "seed"): negative | st.integers(min_value=2**32, max_value=2**63 - 1),
        ("train", "max_epochs"): st.integers(min_value=-(2**63), max_value=0),
        ("train", "batch_size"): st.integers(min_value=-(2**63), max_value=0),
        ("train", "model"): TEXT.filter(lambda s: s not in MODELS),
    }
    if base == "grid":
        return {
            **common,
            ("study", "max_trials"): common[("study", "max_trials")] | st.integers(5, 2**63 - 1),  # grid: 4
            ("study", "max_retries"): negative,
            ("data", "subset", "train"): st.integers(min_value=-(2**63), max_value=0),
            ("train", "lr"): st.floats(max_value=0.0) | st.sampled_from([math.inf, math.nan]),
            ("train", "dropout"): ANY_FLOAT.filter(lambda x: not 0 <= x < 1),
            ("search", "hidden_size"): st.just([]) | st.just([4, 4])
            | st.lists(st.integers(-(2**63), 0), min_size=1, max_size=3, unique=True),
        }
    return {
        **common,
        ("search", "lr"): st.builds(lambda low, d: {"low": low, "high": low - d},
                                    st.floats(1e-6, 1.0), st.floats(0.0, 1e-6))
        | st.builds(lambda low: {"low": low, "high": 1.0, "log": True}, st.floats(-1.0, 0.0)),
        ("search", "dropout", "step"): st.floats(max_value=0.0) | st.sampled_from([0.3, 0.7, 2.0]),
        ("search", "hidden_size", "low"): st.floats(4.0, 15.0),
        ("pruner", "kind"): TEXT.filter(lambda s: s not in PRUNERS),
        ("pruner", "warmup_epochs"): negative | st.integers(3, 2**63 - 1),  # max_epochs is 3
        ("pruner", "startup_trials"): negative,
    }


def dotted(path: tuple[str, ...]) -> str:
    return ".".join(path)


def shown(key: str) -> str:
    """How an error message may show a key: non-printable characters escaped, so that it stays one line
    and cannot drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in key)


@st.composite
def structured_mutation(draw) -> tuple[str, str, bytes, list[str]]:
    """(kind, base, file bytes, keys one of which the error must name): always an invalid file."""
    base = draw(st.sampled_from(sorted(BASES)))
    document = copy.deepcopy(BASES[base])
    kind = draw(st.sampled_from(["unknown key", "wrong type", "bad value"]))
    keys, mutated = [], []
    for _ in range(draw(st.integers(1, 2))):  # one or two problems in one file
        if kind == "unknown key":
            where, table = draw(st.sampled_from(list(tables(document))))
            allowed = RANGE_KEYS if where[:1] == ("search",) and len(where) == 2 else ALLOWED.get(where, set())
            key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in allowed and k not in table))
            table[key] = draw(st.integers(0, 3) | TEXT)
            path = where + (key,)
        elif kind == "wrong type":
            # The type is judged against the valid file, and a key inside a table already replaced is
            # left alone: two changes to one place could make it valid again (study = 3, then study = {}).
            untouched = [(path, value) for path, value in leaves(BASES[base])
                         if not any(path[:len(m)] == m or m[:len(path)] == path for m in mutated)]
            path, value = draw(st.sampled_from(untouched))
            put(document, path, draw(OF_TYPE[draw(st.sampled_from(wrong_types(path, value)))]))
            mutated.append(path)
        else:
            choices = bad_values(base)
            path = draw(st.sampled_from(sorted(choices)))
            put(document, path, draw(choices[path]))
        keys.append(shown(dotted(path)))
        if len(path) == 3 and path[0] == "search":  # a range's own key may be named in the message
            keys.append(shown(f"{dotted(path[:2])}: {path[2]}"))
    return kind, base, toml_document(document).encode(), keys


@st.composite
def raw_mutation(draw) -> tuple[str, str, bytes, list[str]]:
    """Mutations of the file's text; sometimes still a valid study (filtered out by the test)."""
    base = draw(st.sampled_from(sorted(BASES)))
    text = toml_document(BASES[base]).encode()
    kind = draw(st.sampled_from(["random bytes", "truncated", "inserted text", "repeated line", "not UTF-8"]))
    if kind == "random bytes":
        return kind, base, draw(st.binary(max_size=200)), []
    if kind == "truncated":
        return kind, base, text[: draw(st.integers(0, len(text) - 1))], []
    at = draw(st.integers(0, len(text)))
    if kind == "not UTF-8":
        return kind, base, text[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + text[at:], []
    if kind == "repeated line":
        lines = text.splitlines(keepends=True)
        index = draw(st.integers(0, len(lines) - 1))
        return kind, base, b"".join(lines[: index + 1] + [lines[index]] + lines[index + 1:]), []
    return kind, base, text[:at] + draw(st.text(max_size=20)).encode() + text[at:], []


# --- malformed CSV files ---------------------------------------------------------------------------------
def a_valid_score(text: str) -> bool:
    try:
        return 1.0 <= float(text) <= 5.0
    except ValueError:
        return False


BAD_SCORE = (
    st.text(max_size=8).filter(lambda s: not a_valid_score(s))
    | st.floats().filter(lambda x: not 1.0 <= x <= 5.0).map(repr)
    | st.sampled_from(["nan", "inf", "-inf", "1e999", "", "3,0", "three", "0x3"])
)


def csv_bytes(rows, header=COLUMNS) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


@st.composite
def csv_mutation(draw) -> tuple[str, bytes, list[str], bool]:
    """(kind, file bytes, texts the error must contain, always invalid?)."""
    rows = [list(map(str, row)) for row in GOOD_ROWS]
    kind = draw(st.sampled_from(["bad number", "out of range", "bad split", "duplicate id", "empty id",
                                 "missing column", "field count", "no train rows", "header only",
                                 "not UTF-8", "random bytes", "truncated"]))
    index = draw(st.integers(0, len(rows) - 1))
    line = f"line {index + 2}"  # the header is line 1; the rows have no line breaks before the mutated one
    if kind in ("bad number", "out of range"):
        dim = draw(st.sampled_from(DIMENSIONS))
        value = draw(BAD_SCORE if kind == "bad number" else st.floats(-1e6, 1e6).filter(
            lambda x: not 1.0 <= x <= 5.0).map(lambda x: f"{x:.3f}").filter(lambda s: not a_valid_score(s)))
        rows[index][COLUMNS.index(dim)] = value
        column = [] if "\0" in value else [f"column '{dim}'"]  # a NUL byte is malformed CSV, found first
        return kind, csv_bytes(rows), [line, *column], True
    if kind == "bad split":
        rows[index][1] = draw(TEXT.filter(lambda s: s.strip() not in SPLITS))
        column = [] if "\0" in rows[index][1] else ["column 'split'"]
        return kind, csv_bytes(rows), [line, *column], True
    if kind == "duplicate id":
        other = draw(st.integers(0, len(rows) - 1).filter(lambda i: i != index))
        first, second = sorted((index, other))
        rows[second][0] = rows[first][0]
        return kind, csv_bytes(rows), [f"line {second + 2}", "duplicate id"], True
    if kind == "empty id":
        rows[index][0] = draw(st.sampled_from(["", " ", "\t"]))
        return kind, csv_bytes(rows), [line, "column 'id'"], True
    if kind == "missing column":
        gone = draw(st.sets(st.sampled_from(COLUMNS), min_size=1, max_size=3))
        keep = [i for i, name in enumerate(COLUMNS) if name not in gone]
        header = [COLUMNS[i] for i in keep]
        body = [[row[i] for i in keep] for row in rows]
        return kind, csv_bytes(body, header), ["line 1", *(f"'{name}'" for name in gone)], True
    if kind == "field count":
        if draw(st.booleans()):
            rows[index].append(draw(TEXT))
        else:
            rows[index].pop(draw(st.integers(0, len(COLUMNS) - 1)))
        return kind, csv_bytes(rows), [line], True
    if kind == "no train rows":
        gone = draw(st.sampled_from(["train", "dev"]))
        rows = [[r[0], "test" if r[1] == gone else r[1], *r[2:]] for r in rows]
        return kind, csv_bytes(rows), [f"split '{gone}'"], True
    if kind == "header only":
        return kind, csv_bytes([]) if draw(st.booleans()) else b"", [], True
    raw = csv_bytes(rows)
    if kind == "not UTF-8":
        at = draw(st.integers(0, len(raw)))
        line = raw[:at].count(b"\n") + 1
        return kind, raw[:at] + b"\xff" + raw[at:], [f"line {line}", "UTF-8"], True
    if kind == "random bytes":
        return kind, draw(st.binary(max_size=300)), [], False
    return kind, raw[: draw(st.integers(0, len(raw) - 1))], [], False


# --- the harness -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch root (the working directory during the module), a valid CSV, a valid study file, and a
    database that already holds a study with one finished trial."""
    import optuna

    from vadsearch.storage import open_storage

    root = tmp_path_factory.mktemp("properties")
    good_csv = write_csv(root / "good.csv", GOOD_ROWS)
    good_study = root / "good.toml"
    good_study.write_text(toml_document(GRID))
    existing = root / "existing" / "existing.db"
    existing.parent.mkdir()
    study = optuna.create_study(study_name="existing", storage=open_storage(f"sqlite:///{existing}"))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    handlers, level = logging.root.handlers[:], logging.root.level
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # anything written to the working directory would land here, and be seen
        yield {"root": root, "csv": good_csv, "study": good_study, "existing": existing}
    # The CLI points logging at CliRunner's stream, closed after each run: give later tests theirs back.
    logging.root.handlers[:], logging.root.level = handlers, level
    print(f"\n[properties] malformed inputs tried: {sum(CASES.values())} "
          f"(study files {sum(n for k, n in CASES.items() if k.startswith('study'))}, "
          f"CSV files {sum(n for k, n in CASES.items() if k.startswith('csv'))})")
    for kind, count in sorted(CASES.items()):
        print(f"[properties]   {kind}: {count}")


def row_counts(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as connection:
        names = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in names}


def run_worker(workspace, study: Path, data: Path, bad: Path, use_existing: bool, any_of: list[str]) -> str:
    """Run `vadsearch worker` on bad input (`bad` is the malformed file) and check every promise; return
    the error line, which must name `bad` and, when given, one of `any_of`."""
    scratch = bad.parent
    if use_existing:
        database = workspace["existing"]
        before = (row_counts(database), hashlib.sha256(database.read_bytes()).hexdigest())
    else:
        database = scratch / "x.db"
    files_before = files_in(scratch)
    result = runner.invoke(app, ["worker", str(study), "--data", str(data), "--storage", f"sqlite:///{database}",
                                 "--artifacts", str(scratch / "artifacts"), "--device", "cpu", "-q"])
    output = result.output
    assert "Traceback" not in output, output
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{output}"
    assert result.exit_code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert str(bad) in lines[0], f"the error does not name {bad}: {lines[0]}"
    if any_of:
        assert any(text in lines[0] for text in any_of), f"none of {any_of} in: {lines[0]}"
    # No database, no lock file, no checkpoint: no file at all. (An empty artifact directory, made by the
    # worker's write check, is tolerated: see docs/reliability.md.)
    assert files_in(scratch) == files_before, "the worker wrote a file"
    assert not database.with_name(database.name + ".lock").exists() or use_existing
    if use_existing:
        assert (row_counts(database), hashlib.sha256(database.read_bytes()).hexdigest()) == before
    return lines[0]


def files_in(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


def scratch_dir(workspace) -> Path:
    return Path(tempfile.mkdtemp(dir=workspace["root"]))


def test_the_valid_starting_points_are_valid(workspace):
    """Otherwise every mutation below would be 'invalid' for the wrong reason."""
    for document in BASES.values():
        path = workspace["root"] / "base.toml"
        path.write_bytes(toml_document(document).encode())
        load_study_file(path)
    load_corpus(workspace["csv"])
    scratch = scratch_dir(workspace)
    result = runner.invoke(app, ["worker", str(workspace["study"]), "--data", str(workspace["csv"]),
                                 "--storage", f"sqlite:///{scratch}/ok.db", "--artifacts", str(scratch / "a"),
                                 "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (scratch / "ok.db").exists()


@SETTINGS
@given(case=structured_mutation() | raw_mutation(), use_existing=st.booleans())
def test_a_malformed_study_file_is_one_line_naming_the_file_and_key(workspace, case, use_existing):
    kind, base, content, keys = case
    scratch = scratch_dir(workspace)
    study = scratch / "study.toml"
    study.write_bytes(content)
    try:
        load_study_file(study)
    except StudyFileError:
        pass
    else:
        assert not keys, f"a {kind} mutation was accepted:\n{content.decode(errors='replace')}"
        assume(False)  # a raw mutation that is still a valid study: not bad input
    CASES[f"study file: {kind}"] += 1
    run_worker(workspace, study, workspace["csv"], study, use_existing, keys)


@SETTINGS
@given(case=csv_mutation(), use_existing=st.booleans())
def test_a_malformed_csv_is_one_line_naming_the_file_and_line(workspace, case, use_existing):
    kind, content, expect, always_invalid = case
    scratch = scratch_dir(workspace)
    data = scratch / "data.csv"
    data.write_bytes(content)
    try:
        load_corpus(data)
    except DataError:
        pass
    else:
        assert not always_invalid, f"a {kind} mutation was accepted:\n{content!r}"
        assume(False)
    CASES[f"csv: {kind}"] += 1
    line = run_worker(workspace, workspace["study"], data, data, use_existing, [])
    for text in expect:
        assert text in line, f"{text!r} not in: {line}"
