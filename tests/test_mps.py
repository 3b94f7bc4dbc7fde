"""`launch --mps`: the MPS daemon's life, driven through a stand-in nvidia-cuda-mps-control on the PATH.

The stand-in records each call (its arguments, the environment the daemon would serve, what it read on
stdin), so these tests check what launch asks of the real one; whether MPS pays off is the benchmark's.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from search_helpers import write_study
from vadsearch import mps
from vadsearch.cli import app
from vadsearch.errors import ConfigError
from vadsearch.mps import mps_daemon

STAND_IN = """#!{python}
import json, os, sys
stdin = "" if "-d" in sys.argv else sys.stdin.read()
with open({calls!r}, "a") as calls:
    calls.write(json.dumps({{"args": sys.argv[1:], "stdin": stdin,
                            "pipes": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
                            "logs": os.environ.get("CUDA_MPS_LOG_DIRECTORY"),
                            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
if os.environ.get("STAND_IN_FAILS"):
    sys.exit("An MPS control daemon is already running")
"""


@pytest.fixture
def control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the stand-in first on the PATH; returns the file its calls are recorded in."""
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "calls.jsonl"
    script = folder / mps.CONTROL
    script.write_text(STAND_IN.format(python=sys.executable, calls=str(calls)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "SYSTEM_PIPES", tmp_path / "no-system-daemon")
    return calls


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_private_daemon_serves_the_workers_and_quits_after_them(control: Path, tmp_path: Path) -> None:
    with mps_daemon(("0", "2"), tmp_path / "logs") as (env, renumbered):
        started = _calls(control)
        assert [c["args"] for c in started] == [["-d"]]
        assert started[0]["gpus"] == "0,2"  # the daemon serves the launch's GPUs only...
        assert renumbered  # ...and shows them to the workers as 0 and 1
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": started[0]["pipes"], "CUDA_MPS_LOG_DIRECTORY": started[0]["logs"]}
        assert Path(env["CUDA_MPS_PIPE_DIRECTORY"]).is_dir()
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "logs" / "mps")  # kept beside the workers' logs
    quit_call = _calls(control)[1]
    assert quit_call["args"] == [] and quit_call["stdin"] == "quit\n"
    assert quit_call["pipes"] == env["CUDA_MPS_PIPE_DIRECTORY"]  # the same daemon is told to quit
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()


def test_the_daemon_quits_when_the_workers_fail(control: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), mps_daemon((), tmp_path / "logs"):
        raise KeyboardInterrupt
    assert [c["stdin"] for c in _calls(control)] == ["", "quit\n"]
    assert _calls(control)[0]["gpus"] is None  # no --gpus: every GPU


def test_a_running_daemon_is_used_and_left_running(
    control: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipes = tmp_path / "their-mps"
    pipes.mkdir()
    (pipes / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))
    with mps_daemon(("0",), tmp_path / "logs") as (env, renumbered):
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(pipes)} and not renumbered
    assert _calls(control) == []


def test_a_daemon_that_cannot_start_is_one_line_and_leaves_nothing(
    control: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_FAILS", "1")
    with (pytest.raises(ConfigError, match="cannot start the MPS daemon .*: An MPS control daemon is already running"),
          mps_daemon(("0",), tmp_path / "logs")):
        pytest.fail("no worker may start without its daemon")
    assert not Path(_calls(control)[0]["pipes"]).exists()


def test_without_the_control_program_mps_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with (pytest.raises(ConfigError, match="--mps needs nvidia-cuda-mps-control on the PATH"),
          mps_daemon(("0",), tmp_path / "logs")):
        pass


@pytest.mark.slow
def test_launch_with_mps_runs_its_workers_inside_the_daemon(control: Path, tmp_path: Path, tiny_csv: Path) -> None:
    study = write_study(tmp_path / "s.toml", name="mps", data=tiny_csv, search="hidden_size = [4, 8]")
    logs = tmp_path / "logs"
    result = CliRunner().invoke(app, ["launch", str(study), "--workers", "2", "--mps", "--device", "cpu",
                                      "--storage", f"sqlite:///{tmp_path / 'mps.db'}", "--log-dir", str(logs),
                                      "--artifacts", str(tmp_path / "artifacts")])
    assert result.exit_code == 0, result.output
    calls = _calls(control)
    assert [c["stdin"] for c in calls] == ["", "quit\n"]  # started once, quit once, after the workers
    assert (logs / "mps").is_dir() and len(list(logs.glob("worker-*.log"))) == 2


@pytest.mark.slow
def test_the_benchmark_runs_its_mps_rows_inside_a_daemon(control: Path, real_data_path: Path) -> None:
    import argparse
    import importlib.util

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_train", benchmarks / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from vadsearch.config import TrainConfig

    args = argparse.Namespace(data=real_data_path, small=True, device="cpu", epochs_per_worker=2)
    config = TrainConfig(model="lstm", hidden_size=16, embedding_dim=16, layers=1, batch_size=32)
    row = bench.concurrent(args, config, 2, reference_s=1.0, mps=True)
    assert row["finished"] == 2 and row["epochs_per_min"] > 0
    assert [c["stdin"] for c in _calls(control)] == ["", "quit\n"]


def test_launch_with_mps_on_some_gpus_gives_the_workers_the_daemons_numbers(
    control: Path, tmp_path: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vadsearch import launch

    plans = []
    monkeypatch.setattr(launch, "start", lambda plan: plans.append(plan) or [])  # no worker processes
    monkeypatch.setattr(launch, "MEMORY_PROBE", "print(81920 * 2**20)\nprint(81920 * 2**20)")  # two cards
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    study = write_study(tmp_path / "s.toml", name="mps-gpus", data=tiny_csv, search="hidden_size = [4]")
    CliRunner().invoke(app, ["launch", str(study), "--gpus", "0,2", "--workers-per-gpu", "2", "--mps",
                             "--storage", f"sqlite:///{tmp_path / 'g.db'}", "--log-dir", str(tmp_path / "logs")])
    (plan,) = plans
    assert _calls(control)[0]["gpus"] == "0,2"
    assert [plan.environment(i)["CUDA_VISIBLE_DEVICES"] for i in range(plan.workers)] == ["0", "1", "0", "1"]
    assert all(plan.environment(i)["CUDA_MPS_PIPE_DIRECTORY"] == _calls(control)[0]["pipes"] for i in range(4))
