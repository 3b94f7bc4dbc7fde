"""How `launch` starts its workers: GPUs, storage URL and CPU threads through each worker's environment."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vadsearch import launch as launch_module
from vadsearch.errors import ConfigError
from vadsearch.launch import (
    AUTO_WORKERS_PER_GPU,
    LaunchPlan,
    auto_workers_per_gpu,
    check_gpus,
    describe_exits,
    gpu_memory_mib,
    parse_gpus,
    parse_workers_per_gpu,
    sort_exits,
    threads_per_worker,
    visible_devices,
)


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
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert LaunchPlan(Path("s.toml"), workers=8).environment(0)["OMP_NUM_THREADS"] == "2"
    assert LaunchPlan(Path("s.toml"), workers=32).environment(0)["OMP_NUM_THREADS"] == "1"
    assert threads_per_worker(3) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's choice wins
    assert LaunchPlan(Path("s.toml"), workers=8).environment(0)["OMP_NUM_THREADS"] == "6"
    # The cores this process may use (taskset, Slurm, a container's cpuset), not the machine's.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 4})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads_per_worker(1) == 2


@pytest.mark.parametrize("text", ["a", "0;1", "gpu0", "-1", "", ",", "\u00b2"])
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


# ------------------------------------------------------------------------------ --workers-per-gpu auto


def _cards(monkeypatch: pytest.MonkeyPatch, sizes_mib: dict[str, int] | str) -> None:
    """A stand-in for the CUDA probe: the memory of each card the launch's CUDA_VISIBLE_DEVICES names that
    exists (all of them when unset), or `sizes_mib` as the probe's whole program."""
    program = sizes_mib if isinstance(sizes_mib, str) else (
        "import os\n"
        f"sizes = {sizes_mib!r}\n"
        "for gpu in os.environ.get('CUDA_VISIBLE_DEVICES', ','.join(sizes)).split(','):\n"
        "    if gpu in sizes:\n"
        "        print(sizes[gpu] * 2**20)\n")
    monkeypatch.setattr(launch_module, "MEMORY_PROBE", program)


@pytest.mark.parametrize(("text", "parsed"), [(None, None), ("auto", "auto"), ("1", 1), ("12", 12)])
def test_workers_per_gpu_is_a_number_or_auto(text, parsed) -> None:
    assert parse_workers_per_gpu(text) == parsed


@pytest.mark.parametrize("text", ["0", "-2", "many", "2.5", ""])
def test_other_workers_per_gpu_are_one_line_errors(text) -> None:
    with pytest.raises(ConfigError, match="--workers-per-gpu takes a number of workers"):
        parse_workers_per_gpu(text)


@pytest.mark.parametrize(("card", "peaks", "count"), [
    (81920, [9000.0, 30000.0], 2),  # the largest trial decides: 30000 x 1.1 + a context each
    (81920, [9000.0], 7),
    (81920, [100.0], 16),  # at most 16: beyond that the CPU side, not memory, is the limit
    (16000, [40000.0], 1),  # a card too small for one still runs one (it will say why it fails)
])
def test_auto_fits_the_largest_recorded_trial_with_room_to_spare(card, peaks, count) -> None:
    chosen, why = auto_workers_per_gpu(card, peaks)
    assert chosen == count and f"{card:,} MiB" in why and f"{max(peaks):,.0f} MiB" in why


def test_auto_without_a_recorded_trial_starts_a_few_and_says_why() -> None:
    chosen, why = auto_workers_per_gpu(81920, [])
    assert chosen == AUTO_WORKERS_PER_GPU and "no trial of this study has recorded" in why


def test_the_cards_are_the_launchs_own_gpus_as_cuda_sees_them(monkeypatch) -> None:
    # A large card beside a small display GPU: only the cards the workers get count.
    _cards(monkeypatch, {"0": 4096, "1": 81559, "2": 81920})
    assert check_gpus(("1", "2")) == [81559, 81920]
    assert gpu_memory_mib() == [4096, 81559, 81920]  # no --gpus: every visible card
    with pytest.raises(ConfigError, match=r"^--gpus 2,5: CUDA sees 1 of these 2 GPU\(s\) here \(run nvidia-smi"):
        check_gpus(("2", "5"))
    _cards(monkeypatch, "raise SystemExit('CUDA driver initialization failed')")
    with pytest.raises(ConfigError, match="cannot read the GPUs through CUDA"):
        check_gpus(("0",))


def test_the_real_probe_on_a_machine_without_cuda_is_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError,
                       match=r"CUDA sees 0 of these 1 GPU\(s\) here \(no CUDA GPU at all: drop --gpus and pass"):
        check_gpus(("0",))


def test_launch_on_gpus_cuda_cannot_see_stops_before_any_worker(tmp_path, tiny_csv, monkeypatch) -> None:
    from typer.testing import CliRunner

    from search_helpers import write_study
    from vadsearch.cli import app

    monkeypatch.chdir(tmp_path)
    _cards(monkeypatch, {"0": 81920})
    study_file = write_study(tmp_path / "g.toml", name="g", data=tiny_csv, search="hidden_size = [4]")
    result = CliRunner().invoke(app, ["launch", str(study_file), "--gpus", "3"])  # --device auto
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --gpus 3: CUDA sees 0 of these 1 GPU(s) here (no CUDA GPU at all: drop --gpus and pass --device cpu)")
    assert not (tmp_path / "vadsearch-logs").exists() and not (tmp_path / "vadsearch.db").exists()


def test_launch_auto_sizes_from_the_studys_recorded_peak(tmp_path, tiny_csv, monkeypatch) -> None:
    import optuna
    from typer.testing import CliRunner

    from search_helpers import write_study
    from vadsearch.cli import app

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "auto.toml", name="auto", data=tiny_csv, search="hidden_size = [4]",
                             max_epochs=1)
    assert CliRunner().invoke(app, ["worker", str(study_file), "--device", "cpu", "-q"]).exit_code == 0
    # A finished trial that needed 30,000 MiB (a CPU run records none), outside the grid.
    study = optuna.load_study(study_name="auto", storage="sqlite:///vadsearch.db")
    study.add_trial(optuna.create_trial(value=0.1, user_attrs={"peak_gpu_mib": 30000.0}))
    _cards(monkeypatch, {"0": 81920, "1": 40960})
    result = CliRunner().invoke(app, ["launch", str(study_file), "--gpus", "0", "--workers-per-gpu", "auto"])
    assert result.exit_code == 0, result.output
    assert "2 worker(s) per GPU: GPUs of 81,920 MiB; a trial of this study peaked at 30,000 MiB" in result.output
    assert "started 2 worker(s) on auto" in result.output
    status = CliRunner().invoke(app, ["status"]).output
    assert re.search(r"^auto \(lstm, grid\): .*; GPU memory per trial up to 30,000 MiB$", status, re.MULTILINE)


def test_a_failed_worker_is_named_with_how_it_stopped() -> None:
    # A worker killed by the OOM killer (SIGKILL) leaves a log that ends mid-epoch: the launch says so.
    codes = [0, 1, -9, 6, -15]
    failed, gave_way = sort_exits(codes)
    assert (failed, gave_way) == ([1, 2, 4], [3])
    assert describe_exits(codes, failed) == "1 (exit code 1), 2 (killed by SIGKILL), 4 (killed by SIGTERM)"


def test_a_killed_worker_fails_the_launch_only_if_the_study_is_left_unfinished(tmp_path, tiny_csv, monkeypatch) -> None:
    # Killed from outside (a kill -9, the OOM killer) while another worker took over its trial and finished the
    # study: the launch failed all the same. The workers here are stand-ins; how they stopped is what counts.
    from typer.testing import CliRunner

    from search_helpers import write_study
    from vadsearch.cli import app
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import Worker, WorkerOptions

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "k.toml", name="k", data=tiny_csv, search="hidden_size = [4, 8]")
    exits = []
    monkeypatch.setattr(launch_module, "start", lambda plan: [])
    monkeypatch.setattr(launch_module, "wait", lambda processes, on_tick=None, on_exit=None: exits)

    def launch(*codes):
        exits[:] = codes
        return CliRunner().invoke(app, ["launch", str(study_file), "--device", "cpu"])

    result = launch(-9, -9)  # before either made the study
    assert result.exit_code == 1
    assert "worker(s) 0 (killed by SIGKILL), 1 (killed by SIGKILL) stopped; see" in result.stderr
    options = WorkerOptions(storage="sqlite:///vadsearch.db", device="cpu", progress=False)
    Worker(load_study_file(study_file), dataclasses.replace(options, n_trials=1)).run()
    result = launch(-9, 0)  # one of two configurations done
    assert result.exit_code == 1 and "error: worker(s) 0 (killed by SIGKILL) stopped; see" in result.stderr
    Worker(load_study_file(study_file), options).run()
    result = launch(-9, 0)
    assert result.exit_code == 0 and result.stderr.strip() == (
        "note: worker(s) 0 (killed by SIGKILL) stopped; the other workers finished the study")
    # The leaderboard, then the best configuration with its test score, as after a worker finishes.
    assert result.exit_code == 0 and "hidden_size" in result.stdout and "test.mse" in result.stdout
    result = launch(143, 0)  # stopped by SIGTERM: the worker exits 143 itself, its trial queued again
    assert result.exit_code == 0 and result.stderr.strip() == (
        "note: worker(s) 0 (stopped by SIGTERM) stopped; the other workers finished the study")
    result = launch(129, 0)  # its terminal hung up
    assert result.exit_code == 0 and "worker(s) 0 (stopped by SIGHUP) stopped; the other" in result.stderr
    result = launch(1, 0)  # an error of its own fails the launch even so
    assert result.exit_code == 1 and "error: worker(s) 0 (exit code 1) stopped" in result.stderr


def test_launch_refuses_a_changed_study_or_missing_data_before_any_worker(tmp_path, tiny_csv, monkeypatch) -> None:
    # Each used to start its workers, which all stopped with exit code 2: "see logs", and no reason here.
    from typer.testing import CliRunner

    from search_helpers import write_study
    from vadsearch.cli import app
    from vadsearch.storage import open_storage
    from vadsearch.worker import Worker, WorkerOptions
    from vadsearch.studyfile import load_study_file

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "c.toml", name="c", data=tiny_csv, search="hidden_size = [4]")
    Worker(load_study_file(study_file), WorkerOptions(storage="sqlite:///vadsearch.db", device="cpu", n_trials=0,
                                                      progress=False)).run()
    open_storage("sqlite:///vadsearch.db").remove_session()
    write_study(study_file, name="c", data=tiny_csv, search="hidden_size = [4]", max_epochs=5)
    result = CliRunner().invoke(app, ["launch", str(study_file), "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {study_file}: study 'c' already exists in the storage with other settings ([train] max_epochs was "
        "2, now 5); give the study a new [study] name, or use the original file")

    write_study(tmp_path / "d.toml", name="d", data=tmp_path / "missing.csv", search="hidden_size = [4]")
    result = CliRunner().invoke(app, ["launch", "d.toml", "--device", "cpu", "--storage", "sqlite:///d.db"])
    assert result.exit_code == 2 and "missing.csv does not exist" in result.stderr
    assert not (tmp_path / "vadsearch-logs").exists() and not (tmp_path / "d.db").exists()

    # Options each worker would refuse, refused with the worker's own line and exit code.
    fresh = write_study(tmp_path / "e.toml", name="e", data=tiny_csv, search="hidden_size = [4]")
    result = CliRunner().invoke(app, ["launch", str(fresh), "--device", "cpu", "--timeout", "-1"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --timeout must be a number of seconds >= 0, got -1.0"
    # Word vectors or an encoder a trial needs: each worker failed on its own, and launch said "see logs".
    vectors = write_study(tmp_path / "v.toml", name="v", data=tiny_csv, search="hidden_size = [4]",
                          embedding="external", vectors="no-such-vectors.txt")
    result = CliRunner().invoke(app, ["launch", str(vectors), "--device", "cpu"])
    assert result.exit_code == 2 and "word vectors 'no-such-vectors.txt' are neither a file" in result.stderr
    result = CliRunner().invoke(app, ["launch", str(fresh), "--device", "cpu", "--set", "model=bert",
                                      "--set", f"model_name={tmp_path / 'no-such-encoder'}"])
    assert result.exit_code == 2 and "no-such-encoder" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "vadsearch-logs").exists()
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(app, ["launch", str(fresh), "--device", "cpu", "--artifacts", "file"])
    assert result.exit_code == 4 and "cannot write to the artifact directory file/e" in result.stderr
    assert not (tmp_path / "vadsearch-logs").exists()


def test_gpus_with_device_cpu_or_workers_per_gpu_without_gpus_is_refused(tmp_path, tiny_csv, monkeypatch) -> None:
    # The workers trained on the CPU and --gpus was silently ignored.
    from typer.testing import CliRunner

    from search_helpers import write_study
    from vadsearch.cli import app

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "g.toml", name="g", data=tiny_csv, search="hidden_size = [4]")
    result = CliRunner().invoke(app, ["launch", str(study_file), "--gpus", "0,1", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --gpus 0,1 names GPUs, but --device cpu trains on the CPU: drop one of them")
    result = CliRunner().invoke(app, ["launch", str(study_file), "--workers-per-gpu", "2", "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --workers-per-gpu 2 puts workers on each GPU of --gpus: name them (e.g. --gpus 0), or give --workers N")
    # Each worker sees its one GPU as cuda:0: cuda:1 failed in every worker, and the launch said "see logs".
    result = CliRunner().invoke(app, ["launch", str(study_file), "--gpus", "0,1", "--device", "cuda:1"])
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --gpus gives each worker one GPU, which it sees as cuda:0, so --device cuda:1 names none: pass "
        "--device cuda with --gpus")
    assert not (tmp_path / "vadsearch-logs").exists()


def _slow_to_stop_worker() -> subprocess.Popen:
    """A worker that stops only at the second SIGINT: one busy writing its checkpoint when the first came."""
    code = ("import signal, sys, time\n"
            "got = []\n"
            "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
            "print('ready', flush=True)\n"
            "deadline = time.monotonic() + 60\n"
            "while len(got) < 2 and time.monotonic() < deadline:\n"
            "    time.sleep(0.02)\n"
            "sys.exit(130 if len(got) >= 2 else 1)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline() == "ready\n"
    return worker


def test_launch_never_returns_before_its_workers_even_when_the_user_insists(monkeypatch) -> None:
    # A second Ctrl-C after the first's repeat window raised out of the wait: the launch exited 130
    # ("workers stopped") with a worker still running, and an MPS daemon it started was shut down under it.
    from vadsearch import interrupts

    monkeypatch.setattr(interrupts, "REPEAT_WINDOW", 0.2)
    worker = _slow_to_stop_worker()
    presses = [threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)) for delay in (0.3, 1.0)]
    for press in presses:
        press.start()
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.handled():
            launch_module.wait([worker], tick=0.05)
        assert worker.returncode == 130  # it got both presses, and was waited for
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_that_stops_early_is_reported_when_it_stops() -> None:
    quick = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    seen = []
    codes = launch_module.wait([quick, slow], tick=0.05,
                               on_exit=lambda index, code: seen.append((index, code, slow.poll() is None)))
    assert codes == [3, 0] and seen == [(0, 3, True)]  # said while the other still ran
