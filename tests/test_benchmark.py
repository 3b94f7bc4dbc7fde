"""The benchmarks run (small, on the CPU) and report sane figures: correctness, not speed."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_training_benchmark_on_cpu(real_data_path, tmp_path, capsys):
    bench = _load("bench_train")
    if not bench.MINILM.is_dir():
        pytest.skip("the MiniLM tokenizer is needed for the benchmark's encoder")
    out = tmp_path / "rows.json"
    rows = bench.main(["--device", "cpu", "--small", "--epochs-per-worker", "2", "--data", str(real_data_path),
                       "--json", str(out), "--graphs"])
    for name in ("bert", "lstm"):
        assert rows[name]["reference_s"] > 0 and rows[name]["fast_s"] > 0 and rows[name]["speedup"] > 0
        together = rows[f"{name} x2"]
        assert together["finished"] == 2 and together["epochs_per_min"] > 0
    # 6x9 and 72x9 epochs at the measured aggregate rates
    assert rows["grids"]["bert_6x9_min"] == pytest.approx(54 / rows["bert x2"]["epochs_per_min"])
    assert rows["grids"]["lstm_72x9_min"] == pytest.approx(648 / rows["lstm x2"]["epochs_per_min"])
    assert '"speedup"' in out.read_text()
    printed = capsys.readouterr()
    assert "speedup" in printed.out
    assert "bert graphs" not in rows and "CUDA graphs need a CUDA device" in printed.err  # no eager row named graphs


def test_a_whole_grid_runs_through_launch(tiny_csv, tiny_bert_dir):
    bench = _load("bench_grid")
    study = BENCHMARKS.parent / "studies" / "bert.toml"
    row = bench.main([str(study), "--workers", "2", "--device", "cpu", "--data", str(tiny_csv),
                      "--model-name", tiny_bert_dir, "--set", "max_epochs=1"])
    assert row["trials"] == row["complete"] == 6  # the report's 2 batch sizes x 3 learning rates
    assert 0 < row["mean_trial_s"] < row["wall_s"]
    assert 0 < row["best_dev"] < 10
    assert "peak_gpu_mib_max" not in row  # a CPU run holds no GPU memory: no figure rather than a zero


def test_checkpoint_benchmark_writes_both_ways():
    row = _load("bench_checkpoint").main(["--values", "200000", "--epochs", "2", "--epoch-s", "0.05"])
    assert row["checkpoint_gib"] > 0 and row["inline_s_per_epoch"] >= 0.05 and row["background_s_per_epoch"] >= 0.05


def test_orchestration_benchmark_runs_both_loops_on_sqlite(real_data_path, capsys):
    bench = _load("bench_orchestration")
    row = bench.main(["--points", "4", "--repeats", "2", "--data", str(real_data_path)])
    assert row["plain_trials_per_s"] > 0 and row["vadsearch_trials_per_s"] > 0
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert 0 < row["worker_start_s"] < 60
    assert "ratio" in capsys.readouterr().out


def test_an_lstm_grid_runs_on_stand_in_vectors(tiny_csv, tmp_path):
    # GloVe cannot be downloaded here: without the stand-in file the external-embedding trial would fail.
    study = tmp_path / "lstm-glove.toml"
    study.write_text(
        '[study]\nsampler = "grid"\nmax_retries = 0\n'
        '[train]\nmodel = "lstm"\nmax_epochs = 1\nbatch_size = 16\nhidden_size = 8\nvectors = "glove.6B.300d"\n'
        '[search]\nembedding = ["internal", "external"]\n', encoding="utf-8")
    row = _load("bench_grid").main([str(study), "--workers", "1", "--device", "cpu", "--data", str(tiny_csv),
                                    "--random-vectors"])
    assert row["trials"] == row["complete"] == 2


def gpu_suite(*parts: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BENCHMARKS / "gpu_suite.sh"), *parts], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env})


def planned(listed: str) -> dict[str, tuple[int, str]]:
    """A dry run's lines `NAME [LIMIT s]: COMMAND` (or `NAME: skipped, ...`) as {name: (limit, command)}."""
    plan = {}
    for line in listed.splitlines():
        head, command = line.split(": ", 1)
        name, _, limit = head.partition(" [")
        plan[name] = (int(limit.removesuffix(" s]")) if limit else 0, command)
    return plan


def test_the_gpu_suite_asks_each_benchmark_only_for_what_it_takes(tmp_path):
    listed = gpu_suite(OUT=str(tmp_path), BUDGET_S="100000")
    assert listed.returncode == 0, listed.stderr
    plan = planned(listed.stdout)
    assert list(plan) == ["tests", "bert", "grid-bert", "lstm", "grid-lstm"]
    for _, command in plan.values():
        argv = shlex.split(command)
        if argv[1].startswith("benchmarks/"):
            bench = _load(Path(argv[1]).stem)
            bench.parser().parse_args(argv[2:])  # an unknown or misspelt flag exits here
    assert "--graphs" in plan["bert"][1] and "--mps" in plan["grid-bert"][1]
    # The GPU tests, and only their modules: the others import what the GPU machine lacks.
    gpu_modules = {arg for arg in shlex.split(plan["tests"][1]) if arg.startswith("tests/")}
    assert "tests/test_step.py" in gpu_modules and "tests/test_postgres.py" not in gpu_modules
    unknown = gpu_suite("tests", "nope")
    assert unknown.returncode == 2 and "unknown part: nope" in unknown.stderr and not unknown.stdout


def test_the_gpu_suite_fits_its_parts_into_one_budget(tmp_path):
    # Counted as if each part ran to its limit: tests takes its 180 s, bert the 220 s left of 400 (its
    # own limit is 600), and grid-bert, with nothing left, is skipped rather than started.
    plan = planned(gpu_suite("tests", "bert", "grid-bert", OUT=str(tmp_path), BUDGET_S="400").stdout)
    assert {name: limit for name, (limit, _) in plan.items()} == {"tests": 180, "bert": 220, "grid-bert": 0}
    assert plan["grid-bert"][1] == "skipped, 0 s of the 400 s budget left"
    # A part that would get less than MIN_PART_S is skipped too; one limit for all parts still fits the budget.
    plan = planned(gpu_suite("tests", "lstm", OUT=str(tmp_path), BUDGET_S="230", MIN_PART_S="60").stdout)
    assert plan["tests"][0] == 180 and plan["lstm"][1].startswith("skipped, 50 s")
    plan = planned(gpu_suite("bert", "lstm", OUT=str(tmp_path), BUDGET_S="150", PART_LIMIT_S="100").stdout)
    assert plan["bert"][0] == 100 and plan["lstm"][1].startswith("skipped")
    assert not list(tmp_path.iterdir())  # a dry run writes no summary


def test_staging_gives_the_gpu_machine_the_corpus_model_tokens_and_wheels(tmp_path, tiny_csv, monkeypatch):
    shared, root = tmp_path / "shared", tmp_path / "checkout"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "emobank.csv").write_bytes(tiny_csv.read_bytes())
    model = shared / "models" / "minilm-l6-h384-uncased-fp16"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    model.chmod(0o555)  # read-only, as ../shared is
    (shared / "tools").mkdir()
    wheels = shared / "tools" / "device-wheels.sh"  # the real one downloads; this one records its call
    wheels.write_text('#!/bin/sh\nmkdir -p .whl && echo "$@" > .whl/asked\n')
    wheels.chmod(0o755)
    root.mkdir()
    staged = subprocess.run([str(BENCHMARKS / "stage_gpu.sh")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SHARED": str(shared), "ROOT": str(root), "PYTHON": sys.executable})
    assert staged.returncode == 0, staged.stderr
    assert (root / ".gpu" / "emobank.csv").read_bytes() == tiny_csv.read_bytes()
    assert (root / ".gpu" / "minilm" / "config.json").read_text() == "{}"
    assert (root / ".whl" / "asked").read_text().split() == ["core"]

    # The GPU machine has no spaCy: the LSTM's tokens must come from the staged cache alone.
    from vadsearch import wordcache
    from vadsearch.data import load_corpus

    monkeypatch.setenv("VADSEARCH_CACHE", str(root / ".gpu" / "cache"))
    monkeypatch.setattr(wordcache, "spacy_version", lambda: None)
    corpus = load_corpus(root / ".gpu" / "emobank.csv")

    def no_spacy(texts, lowercase):
        raise AssertionError("tokenized again instead of reading the staged tokens")

    for lowercase in (True, False):
        tokens = wordcache.corpus_tokens(corpus, lowercase, no_spacy)
        assert len(tokens["train"]) == len(corpus.train.texts) and tokens["train"][0]


@pytest.mark.parametrize("name", ["bench_checkpoint", "bench_grid", "bench_orchestration", "bench_train"])
def test_each_benchmarks_help_carries_its_whole_description_and_examples(name):
    shown = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    description = " ".join(_load(name).__doc__.split("\n\n")[0].split())
    assert description in " ".join(shown.stdout.split())  # not cut after its first line
    assert f"python benchmarks/{name}.py" in shown.stdout  # the examples, with their line breaks
