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


def test_the_gpu_suite_asks_each_benchmark_only_for_what_it_takes(tmp_path):
    listed = subprocess.run([str(BENCHMARKS / "gpu_suite.sh")], capture_output=True, text=True, check=True,
                            env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}).stdout.splitlines()
    parts = dict(line.split(": ", 1) for line in listed)
    assert list(parts) == ["tests", "bert", "grid-bert", "lstm", "grid-lstm"]
    for command in parts.values():
        argv = shlex.split(command)
        if argv[1].startswith("benchmarks/"):
            bench = _load(Path(argv[1]).stem)
            bench.parser().parse_args(argv[2:])  # an unknown or misspelt flag exits here
    assert "--graphs" in parts["bert"] and "--mps" in parts["grid-bert"]
    unknown = subprocess.run([str(BENCHMARKS / "gpu_suite.sh"), "nope"], env={**os.environ, "DRY_RUN": "1"},
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown part: nope" in unknown.stderr


@pytest.mark.parametrize("name", ["bench_checkpoint", "bench_grid", "bench_orchestration", "bench_train"])
def test_each_benchmarks_help_carries_its_whole_description_and_examples(name):
    shown = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    description = " ".join(_load(name).__doc__.split("\n\n")[0].split())
    assert description in " ".join(shown.stdout.split())  # not cut after its first line
    assert f"python benchmarks/{name}.py" in shown.stdout  # the examples, with their line breaks
