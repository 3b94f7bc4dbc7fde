"""The training benchmark runs (small, on the CPU) and reports sane figures: correctness, not speed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"

pytestmark = pytest.mark.slow


def test_small_benchmark_on_cpu(real_data_path, capsys):
    if not (BENCH.parents[2] / "shared" / "models" / "minilm-l6-h384-uncased-fp16").is_dir():
        pytest.skip("the MiniLM tokenizer is needed for the benchmark's encoder")
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--small", "--data", str(real_data_path)])
    for name in ("bert", "lstm"):
        assert rows[name]["reference_s"] > 0 and rows[name]["fast_s"] > 0 and rows[name]["speedup"] > 0
    assert "speedup" in capsys.readouterr().out
