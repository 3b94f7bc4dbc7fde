"""Path escapes: no study name, configuration fingerprint or symlink can put a run directory (where a
worker writes and deletes checkpoints) outside the artifact root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vadsearch.checkpoint import run_directory
from vadsearch.config import TrainConfig
from vadsearch.errors import ConfigError, StudyFileError
from vadsearch.studyfile import StudySpec, load_study_file

# Characters that matter for paths, so that most generated names are near misses, not plain noise.
PATHY = st.lists(st.sampled_from(list("aZ09._-/\\~ \0\n:%$\u2215\uff0e") + ["..", "../", "/etc"]),
                 max_size=40).map("".join)
NAMES = PATHY | st.text(max_size=70)
FINGERPRINT = TrainConfig().fingerprint()


def accepted(name: str) -> bool:
    try:
        StudySpec(name=name, path=Path("x.toml"), sampler="grid", base=TrainConfig(model="baseline"), space=())
    except StudyFileError:
        return False
    return True


@settings(max_examples=300, deadline=None, database=None)
@given(name=NAMES | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))  # many accepted ones
def test_any_accepted_study_name_keeps_the_run_directory_inside_the_root(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "artifacts"
    if not accepted(name):
        return
    path = run_directory(root, name, FINGERPRINT)
    assert path == root / name / FINGERPRINT  # exactly two components below the root
    assert path.resolve().parent.parent == root.resolve()
    assert not any(part in ("", ".", "..") for part in path.relative_to(root).parts)


@settings(max_examples=300, deadline=None, database=None)
@given(name=NAMES)
def test_names_that_could_escape_are_refused_by_the_study_file(name):
    if "/" in name or "\\" in name or "\0" in name or name in ("", ".", "..") or name.startswith((".", "-", "~")):
        assert not accepted(name)


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/../../b", "/etc", "~root", "a\\b", "a\0b", " a",
                                  "a" * 65, "-rf", ".hidden", "ü", "a\nb"])
def test_escaping_names_are_refused_with_the_key_named(tmp_path, name):
    study = tmp_path / "s.toml"
    study.write_text(f"[study]\nname = {json.dumps(name)}\n[train]\nmodel = \"baseline\"\n")
    with pytest.raises(StudyFileError, match="study.name") as error:
        load_study_file(study)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stem", ["..", "-x", "a b", "é"])
def test_a_file_name_that_is_not_a_study_name_needs_a_name_key(tmp_path, stem):
    study = tmp_path / f"{stem}.toml"
    study.write_text('[train]\nmodel = "baseline"\n')
    with pytest.raises(StudyFileError, match="study.name"):
        load_study_file(study)


@pytest.mark.parametrize("study, fingerprint", [
    ("..", FINGERPRINT), (".", FINGERPRINT), ("", FINGERPRINT), ("a/b", FINGERPRINT), ("/etc", FINGERPRINT),
    ("a\\b", FINGERPRINT), ("a\0b", FINGERPRINT), ("s", ".."), ("s", "../../x"), ("s", "/tmp"), ("s", ""),
])
def test_run_directory_refuses_parts_that_are_not_one_plain_name(tmp_path, study, fingerprint):
    with pytest.raises(ConfigError, match="cannot name a directory"):
        run_directory(tmp_path / "artifacts", study, fingerprint)


def test_run_directory_refuses_a_symlink_out_of_the_root(tmp_path):
    root = tmp_path / "artifacts"
    outside = tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "study")
    with pytest.raises(ConfigError, match="outside the artifact root"):
        run_directory(root, "study", FINGERPRINT)
    # A root that is itself a symlink is fine: containment is checked after resolving both.
    os.symlink(root, tmp_path / "link")
    os.symlink(tmp_path / "link", tmp_path / "link2")
    (root / "study").unlink()
    assert run_directory(tmp_path / "link2", "study", FINGERPRINT) == tmp_path / "link2" / "study" / FINGERPRINT


def test_run_directory_keeps_the_root_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Stored on the trial as written: relative roots stay relative (other machines mount them elsewhere).
    assert run_directory(Path("vadsearch-artifacts"), "lstm", FINGERPRINT) == Path("vadsearch-artifacts/lstm") / FINGERPRINT


def test_fingerprints_are_plain_hex():
    for config in (TrainConfig(), TrainConfig(model="bert"), TrainConfig(lr=0.5, hidden_size=3)):
        fingerprint = config.fingerprint()
        assert len(fingerprint) == 16 and set(fingerprint) <= set("0123456789abcdef")
