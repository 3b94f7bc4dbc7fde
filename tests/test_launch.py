"""How `launch` starts its workers: GPUs, storage URL and CPU threads through each worker's environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vadsearch.errors import ConfigError
from vadsearch.launch import LaunchPlan, parse_gpus, threads_per_worker, visible_devices


def test_workers_go_round_robin_over_the_gpus() -> None:
    plan = LaunchPlan(Path("s.toml"), workers=5, gpus=("0", "3"))
    assert [plan.environment(i)["CUDA_VISIBLE_DEVICES"] for i in range(5)] == ["0", "3", "0", "3", "0"]


def test_the_storage_url_travels_in_the_environment_not_the_command_line() -> None:
    secret = "postgresql://vad:hunter2@db/vad"
    plan = LaunchPlan(Path("s.toml"), workers=1, storage=secret)
    assert plan.environment(0)["VADSEARCH_STORAGE"] == secret
    assert not any("hunter2" in part for part in plan.command())


def test_each_worker_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert LaunchPlan(Path("s.toml"), workers=8).environment(0)["OMP_NUM_THREADS"] == "2"
    assert LaunchPlan(Path("s.toml"), workers=32).environment(0)["OMP_NUM_THREADS"] == "1"
    assert threads_per_worker(3) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice wins
    assert LaunchPlan(Path("s.toml"), workers=8).environment(0)["OMP_NUM_THREADS"] == "6"


@pytest.mark.parametrize("text", ["a", "0;1", "gpu0", "-1"])
def test_bad_gpu_lists_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--gpus takes GPU indices"):
        parse_gpus(text)


def test_gpu_lists_parse() -> None:
    assert parse_gpus("0, 1,,2") == ("0", "1", "2")
    assert parse_gpus(None) == ()


def test_at_least_one_worker() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        LaunchPlan(Path("s.toml"), workers=0)


def test_every_worker_gets_the_launch_environment() -> None:
    # How an MPS daemon's pipes reach the workers.
    plan = LaunchPlan(Path("s.toml"), workers=2, gpus=("1",), env=(("CUDA_MPS_PIPE_DIRECTORY", "/tmp/mps-x"),))
    assert [plan.environment(i)["CUDA_MPS_PIPE_DIRECTORY"] for i in range(2)] == ["/tmp/mps-x"] * 2
    assert plan.environment(1)["CUDA_VISIBLE_DEVICES"] == "1"


def test_behind_a_daemon_serving_exactly_their_gpus_workers_count_them_from_zero() -> None:
    # An MPS daemon started with CUDA_VISIBLE_DEVICES=0,2 shows those GPUs to its clients as 0 and 1.
    plan = LaunchPlan(Path("s.toml"), workers=4, gpus=("0", "2"), renumbered=True)
    assert [plan.environment(i)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "0", "1"]


def test_gpu_indices_count_the_gpus_this_process_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(("0", "3")) == ("0", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # as a scheduler sets it for a job given two GPUs
    assert visible_devices(("0", "1")) == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c,GPU-77ab")
    assert visible_devices(("1",)) == ("GPU-77ab",)
    with pytest.raises(ConfigError, match=r"--gpus 2: this process sees 2 GPU\(s\)"):
        visible_devices(("0", "2"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="sees 0 GPU"):
        visible_devices(("0",))
