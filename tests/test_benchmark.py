"""The benchmarks run (small, on the CPU) and report sane figures: correctness, not speed."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_the_aggregate_rate_counts_only_the_span_the_workers_shared():
    aggregate_rate = _load("bench_train").aggregate_rate
    # Together from t=2 to t=3: each did one epoch in that second. Worker 0's lone start does not count.
    assert aggregate_rate([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]) == (pytest.approx(2.0), True)
    # Worker 0 at 1 epoch/s until t=2, then 0.5 epoch/s beside worker 1: its own span's rate (0.67/s) would
    # count its time alone; from t=2 to t=4 it did one epoch and worker 1 one: 1 epoch/s together.
    assert aggregate_rate([[0.0, 1.0, 2.0, 4.0, 6.0], [2.0, 4.0]]) == (pytest.approx(1.0), True)
    # One after the other: no shared span; the whole span's rate is a lower bound (it was 2/s, as if together).
    assert aggregate_rate([[0.0, 1.0], [2.0, 3.0]]) == (pytest.approx(2 / 3), False)


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs-per-worker", "1"], "--epochs-per-worker must be at least 2"),
    (["--models", "bret"], "--models takes bert, lstm or bert,lstm; got 'bret'"),
    (["--quality", "--minilm", "/nonexistent"], "--quality needs the pretrained MiniLM; /nonexistent is not"),
    (["--mps", "--device", "cpu"], "--mps shares a CUDA GPU; --device cpu is none"),
])
def test_training_benchmark_flags_that_would_measure_nothing_are_refused_at_once(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load("bench_train").main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_quality_guard_fails_the_benchmark_beyond_its_tolerance():
    bench = _load("bench_train")
    row = {"reference_best_dev": 0.0700, "fast_best_dev": 0.0731, "difference": 0.0031, "within_target": 0.0}
    assert bench.failed_guards({"quality": row, "bert": {"speedup": 3.0}}) == [
        "quality: best dev 0.0731 against the reference's 0.0700, 0.0031 apart (target 0.002)"]
    assert bench.failed_guards({"quality": {**row, "fast_best_dev": 0.0712, "within_target": 1.0}}) == []


def test_the_reference_loop_trains_the_configuration_it_is_given(tiny_corpus):
    from reference import reference_run
    from vadsearch.config import TrainConfig

    config = TrainConfig(model="lstm", max_epochs=1, batch_size=16, hidden_size=8, embedding_dim=8, layers=1)
    # The same configuration trained by the reference loop with another optimizer would score differently:
    # the guard compares two ways of doing the same training, not two trainings.
    adam, adamw = (reference_run(config.replace(optimizer=name, weight_decay=0.1), tiny_corpus, torch.device("cpu"))
                   for name in ("adam", "adamw"))
    assert adam[1] != adamw[1]
    with pytest.raises(ValueError, match="without gradient clipping or a schedule"):
        reference_run(config.replace(grad_clip=1.0), tiny_corpus, torch.device("cpu"))


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
    bench = _load("bench_checkpoint")
    row = bench.main(["--values", "200000", "--epochs", "2", "--epoch-s", "0.05"])
    assert row["inline_s_per_epoch"] >= 0.05 and row["background_s_per_epoch"] >= 0.05
    # 200,000 float32 values and two Adam moments of the same size: 2.4 MB and a little more.
    assert 3 * 200_000 * 4 / 2**30 < row["checkpoint_gib"] < 1.05 * 3 * 200_000 * 4 / 2**30
    # One epoch keeps one checkpoint: the size of one, not half of it.
    assert bench.main(["--values", "200000", "--epochs", "1", "--epoch-s", "0.01"])["checkpoint_gib"] == (
        pytest.approx(row["checkpoint_gib"], rel=0.01))


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


def test_the_gpu_suite_fails_when_a_part_does(tmp_path):
    # It exited 0 whatever its parts did: a device call read as a success with no figure measured.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 81559 MiB, 0.0'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    ran = subprocess.run([str(BENCHMARKS / "gpu_suite.sh"), "tests"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(out),
                              "PART_LIMIT_S": "1", "MIN_PART_S": "1", "BUDGET_S": "100"})
    summary = (out / "summary.txt").read_text()
    assert ran.returncode == 1 and summary.startswith("Fake GPU") and "tests: exit " in summary
    assert "tests: exit 0 " not in summary


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
