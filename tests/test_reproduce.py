"""`vadsearch reproduce`: the report's studies in order, resumable, then the comparison and the freezing figure."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search_helpers import REPO, vadsearch
from vadsearch import reproduce
from vadsearch.errors import StudyFileError, VadsearchError
from vadsearch.storage import open_storage

MINILM = (REPO / ".." / "shared" / "models" / "minilm-l6-h384-uncased-fp16").resolve()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def specs(**options):
    return {s.name: s for s in reproduce.load_specs(reproduce.ReproduceOptions(**options))}


def test_quick_studies_are_small_and_named_apart():
    quick = specs(quick=True, model_name="some/encoder")
    assert list(quick) == [f"quick-{name}" for name in reproduce.STUDIES]
    lstm = quick["quick-lstm"]
    base = lstm.base
    assert (base.hidden_size, base.layers, base.embedding, base.max_epochs) == (32, 1, "internal", 2)
    assert {p.name for p in lstm.space} == {"lr", "bidirectional"} and lstm.max_trials == 6
    assert lstm.data_subset == (800, 100, 100)
    bert = quick["quick-bert"]
    assert [p.name for p in bert.space] == ["lr"] and bert.base.batch_size == 32 and bert.base.max_epochs == 1
    assert bert.data_subset[1:] == lstm.data_subset[1:]  # the same dev and test sentences for every study
    freeze = quick["quick-bert-freeze"]
    assert freeze.grid() == [{"trainable_layers": w} for w in ("first-2", "middle-2", "last-2")]
    assert freeze.base.max_epochs == 2  # curves, not points
    assert {s.base.model_name for s in quick.values() if s.base.model == "bert"} == {"some/encoder"}
    assert specs(quick=True)["quick-bert-cased"].base.model_name == "bert-base-uncased"


def test_full_studies_are_the_files_unless_an_encoder_is_given():
    full = specs()
    assert list(full) == list(reproduce.STUDIES) and full["lstm"].max_trials == 72
    assert full["bert-cased"].base.model_name == "bert-base-cased"
    local = specs(model_name="/models/x")
    assert {local[n].base.model_name for n in ("bert", "bert-cased", "bert-freeze")} == {"/models/x"}


def test_the_bert_winner_is_carried_where_it_is_not_searched():
    full = specs()
    cased = reproduce.carry_over(full["bert-cased"], {"batch_size": 16, "lr": 5e-5})
    assert (cased.base.batch_size, cased.base.lr) == (16, 5e-5)
    quick = specs(quick=True)
    freeze = reproduce.carry_over(quick["quick-bert-freeze"], {"lr": 3e-5})
    assert freeze.base.lr == 3e-5 and freeze.base.batch_size == 32


def test_a_missing_studies_directory_is_named(tmp_path):
    with pytest.raises(StudyFileError, match="baseline.toml: missing"):
        reproduce.load_specs(reproduce.ReproduceOptions(studies_dir=tmp_path))


def test_an_installed_package_reads_the_studies_of_its_working_directory(tmp_path, monkeypatch):
    # Installed (the Docker image), the package has no studies/ beside it; the image puts them in its WORKDIR.
    assert reproduce.default_studies_dir() == REPO / "studies"  # this checkout
    monkeypatch.setattr(reproduce, "CHECKOUT_STUDIES", tmp_path / "site-packages" / "studies")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    for name in reproduce.STUDIES:
        (tmp_path / "studies" / f"{name}.toml").write_text((REPO / "studies" / f"{name}.toml").read_text())
    assert [s.name for s in reproduce.load_specs(reproduce.ReproduceOptions())] == list(reproduce.STUDIES)


@pytest.mark.parametrize(("change", "message"), [
    ({"out": Path("/proc/results")}, "cannot write to the results directory /proc/results"),
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"device": "cuda:99"}, "device cuda:99 asked for, but this"),  # no GPU here, or not 100 of them
    ({"model_name": "/no/such/encoder"}, "cannot load the tokenizer of '/no/such/encoder'"),
    # The LSTM study's vectors: after the baseline study, with advice reproduce had no option for.
    ({"quick": False, "vectors": "no-such-vectors.txt"}, "word vectors 'no-such-vectors.txt' are neither a file"),
])
def test_what_would_fail_after_hours_of_studies_fails_before_the_first(tmp_path, tiny_csv, tiny_bert_dir, change,
                                                                       message):
    options = reproduce.ReproduceOptions(storage=f"sqlite:///{tmp_path}/r.db", artifacts=tmp_path / "art",
                                         data=tiny_csv, device="cpu", out=tmp_path / "results", quick=True,
                                         model_name=str(tiny_bert_dir), progress=False)
    started = []
    with pytest.raises(VadsearchError, match=re.escape(message)):
        reproduce.run(dataclasses.replace(options, **change), on_study=lambda spec: started.append(spec.name))
    assert started == [] and not (tmp_path / "r.db").exists()
    assert not (tmp_path / "results").exists() or change.get("out")  # no empty results folder left behind


def test_the_lstm_study_takes_the_vectors_given():
    full = specs(vectors="/data/glove.txt")
    assert full["lstm"].base.vectors == "/data/glove.txt"
    assert specs()["lstm"].base.vectors == "glove.6B.300d"  # the file's own


def trials_by_study(url: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = open_storage(url, create=False)
    return {name: optuna.load_study(study_name=name, storage=storage).trials
            for name in optuna.get_all_study_names(storage)}


def check_results(out: Path, studies: list[str]) -> list[dict]:
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["study"] for r in rows] == studies
    assert all(r["dev_mse"] and r["test_mse"] for r in rows)
    markdown = (out / "comparison.md").read_text()
    assert all(f"| {s} " in markdown for s in studies) and "test_r_d" in markdown
    assert (out / "freezing.png").read_bytes()[:8] == PNG_SIGNATURE
    html = (out / "freezing.html").read_text()
    call = html.split("Plotly.newPlot(")[-1]
    traces = json.JSONDecoder().raw_decode(call, call.index("["))[0]
    assert [t["name"] for t in traces] == [f"trainable_layers={w}" for w in ("first-2", "middle-2", "last-2")]
    return rows


def test_quick_reproduction_of_the_tiny_corpus_runs_in_process_and_resumes(tmp_path, tiny_csv, tiny_bert_dir):
    """The shipped study files, quick, on the tiny corpus and the tiny BERT: the orchestration in seconds."""
    options = reproduce.ReproduceOptions(storage=f"sqlite:///{tmp_path}/r.db", artifacts=tmp_path / "art",
                                         data=tiny_csv, device="cpu", out=tmp_path / "results", quick=True,
                                         model_name=tiny_bert_dir, progress=False)
    started = []
    result = reproduce.run(options, on_study=lambda spec: started.append(spec.name))
    names = [f"quick-{n}" for n in reproduce.STUDIES]
    assert started == result.studies == names and not result.interrupted
    check_results(tmp_path / "results", names)
    trials = trials_by_study(options.storage)
    assert {n: len(t) for n, t in trials.items()} == {"quick-baseline": 1, "quick-lstm": 6, "quick-bert": 3,
                                                       "quick-bert-cased": 1, "quick-bert-freeze": 3}
    winner = min((t for t in trials["quick-bert"] if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    for carried in ("quick-bert-cased", "quick-bert-freeze"):
        assert {t.user_attrs["config"]["lr"] for t in trials[carried]} == {winner.params["lr"]}

    ran = {}
    again = reproduce.run(options, on_done=lambda spec, summary: ran.update({spec.name: len(summary.trials)}))
    assert ran == dict.fromkeys(names, 0)  # each said finished, none "running"
    assert {n: len(t) for n, t in trials_by_study(options.storage).items()} == {n: len(t) for n, t in trials.items()}
    assert again.table.equals(result.table)


@pytest.mark.slow
def test_reproduce_quick_end_to_end_on_the_real_data(tmp_path, real_data_path):
    """`vadsearch reproduce --quick` through the real entry point, as the README shows it; then once more."""
    if not MINILM.is_dir():
        pytest.skip(f"the MiniLM encoder is not at {MINILM}")
    args = ["reproduce", "--quick", "--model-name", str(MINILM), "--data", str(real_data_path), "--device", "cpu",
            "--storage", f"sqlite:///{tmp_path}/r.db", "-q"]
    started = time.monotonic()
    first = vadsearch(*args, cwd=tmp_path, timeout=600)
    seconds = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-3000:]
    names = [f"quick-{n}" for n in reproduce.STUDIES]
    rows = check_results(tmp_path / "results", names)
    assert [int(r["complete"]) for r in rows] == [1, 6, 3, 1, 3], f"took {seconds:.0f} s"
    assert "quick-bert-freeze" in first.stdout and "wrote results/freezing.png" in first.stdout
    assert float(rows[0]["dev_mse"]) > 0.05  # the constant baseline on the real data, not a toy

    trials = {n: len(t) for n, t in trials_by_study(f"sqlite:///{tmp_path}/r.db").items()}
    again = vadsearch(*args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: len(t) for n, t in trials_by_study(f"sqlite:///{tmp_path}/r.db").items()} == trials
    assert again.stdout == first.stdout  # the same table: nothing was run again
    assert "study quick-lstm: 6 trial(s) run" in first.stderr
    assert "study quick-lstm: finished before, nothing to run" in again.stderr

    rated = vadsearch("predict", "quick-lstm", "What a wonderful day!", "--storage", f"sqlite:///{tmp_path}/r.db",
                      "-f", "json", cwd=tmp_path)
    assert rated.returncode == 0, rated.stderr
    assert all(1 <= json.loads(rated.stdout)[0][k] <= 5 for k in "VAD")


def test_a_bert_grid_whose_every_trial_failed_does_not_stop_the_reproduction(tmp_path, caplog):
    """The cased and freezing studies keep their files' values, and the table is still written."""
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    study = optuna.create_study(study_name="bert", storage=storage)
    study.set_user_attr("vadsearch", {"name": "bert", "sampler": "grid", "base": {"model": "bert"}})
    for _ in range(2):
        trial = study.ask()
        trial.set_user_attr("fail_reason", "ConfigError: no such encoder")
        study.tell(trial, state=TrialState.FAIL)
    assert reproduce._winner(storage, "bert") is None
    assert "every trial of study 'bert' failed" in caplog.text
