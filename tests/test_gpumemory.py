"""Out of GPU memory with several workers on one card: the card's fault stops the worker and spends no
retry; a configuration too large on its own is its own error. Run on the CPU, with torch's OutOfMemoryError
raised where a GPU would raise it and the card's memory readings given."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from search_helpers import points_finished, write_study
from vadsearch import failures, gpumemory
from vadsearch import launch as launcher
from vadsearch import train as train_module
from vadsearch.cli import app
from vadsearch.config import TrainConfig
from vadsearch.errors import GpuMemoryError, MachineFault, TrainingError
from vadsearch.fit import fit
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions, point_key

GIB = 1024**3
# An 80 GiB card: 8 GiB free; this process holds 10 GiB, the others 62 GiB (seven more workers).
CROWDED = (8 * GIB, 80 * GIB, 10 * GIB)
# The same card with this process alone on it: it holds 71 GiB and still ran out.
ALONE = (8 * GIB, 80 * GIB, 71 * GIB)

TINY_LSTM = TrainConfig(model="lstm", hidden_size=8, embedding_dim=8, batch_size=8, eval_batch_size=16,
                        max_epochs=3, lr=0.02, seed=0)


def test_a_crowded_card_is_the_machines_fault_and_says_what_to_do():
    error = gpumemory.blame("cuda:0", free=CROWDED[0], total=CROWDED[1], own=CROWDED[2])
    assert isinstance(error, GpuMemoryError) and isinstance(error, MachineFault)
    assert "other processes hold 62.0 GiB of its 80.0 GiB, this one 10.0 GiB" in str(error)
    assert "--workers-per-gpu" in str(error) and "without spending a retry" in str(error)
    assert len(f"GpuMemoryError: {error}") < 500  # stored whole as the trial's fail_reason


def test_a_configuration_too_large_on_its_own_is_its_error():
    error = gpumemory.blame("cuda:1", free=ALONE[0], total=ALONE[1], own=ALONE[2])
    assert isinstance(error, TrainingError) and not isinstance(error, MachineFault)
    assert "other processes hold 1.0 GiB of its 80.0 GiB, this one 71.0 GiB" in str(error)
    assert "lower batch_size" in str(error)


def test_off_cuda_the_error_passes_unchanged():
    with pytest.raises(torch.OutOfMemoryError, match="as it was"), gpumemory.blamed(torch.device("cpu")):
        raise torch.OutOfMemoryError("as it was")
    with pytest.raises(ValueError), gpumemory.blamed(torch.device("cpu")):
        raise ValueError("not about memory")


def _out_of_memory_at(monkeypatch, epoch: int, card: tuple[int, int, int], times: int = 1) -> list[int]:
    """Training raises torch's OutOfMemoryError in epoch `epoch` (the first `times` times it gets there),
    on a card whose memory reads `card`. Returns the epochs trained."""
    real = train_module._train_epoch
    trained, raised = [], []

    def train_epoch(run, step, at, *args):
        if at == epoch and len(raised) < times:
            raised.append(at)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        trained.append(at)
        return real(run, step, at, *args)

    monkeypatch.setattr(train_module, "_train_epoch", train_epoch)
    monkeypatch.setattr(gpumemory, "readings", lambda device: card)
    return trained


def test_training_reports_whose_fault_and_the_last_epoch_stays_resumable(tiny_corpus, tmp_path, monkeypatch):
    _out_of_memory_at(monkeypatch, 2, CROWDED)
    with pytest.raises(GpuMemoryError, match="out of GPU memory on cpu: other processes hold 62.0 GiB"):
        fit(TINY_LSTM, tiny_corpus, run_dir=tmp_path, device="cpu")
    assert (tmp_path / "epoch-0001.pt").is_file()
    monkeypatch.undo()
    resumed = fit(TINY_LSTM, tiny_corpus, run_dir=tmp_path, device="cpu")
    assert resumed.resumed_from == 1 and len(resumed.history) == 3

    _out_of_memory_at(monkeypatch, 1, ALONE)
    with pytest.raises(TrainingError, match="this one 71.0 GiB; this configuration does not fit"):
        fit(dataclasses.replace(TINY_LSTM, seed=1), tiny_corpus, device="cpu")


@pytest.fixture
def study(tmp_path, tiny_csv):
    path = write_study(tmp_path / "oom.toml", name="oom", data=tiny_csv, search="hidden_size = [4, 8]",
                       study="max_retries = 0")
    return load_study_file(path), f"sqlite:///{tmp_path}/oom.db"


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="oom", storage=open_storage(url, create=False)).trials


def test_a_crowded_card_stops_the_worker_and_spends_no_retry(study, tmp_path, monkeypatch):
    spec, url = study
    options = WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False)
    _out_of_memory_at(monkeypatch, 2, CROWDED)
    with pytest.raises(GpuMemoryError):
        Worker(spec, options).run()
    [failed] = [t for t in _trials(url) if t.state == TrialState.FAIL]
    assert failures.kind(failed.user_attrs) == failures.MACHINE_FAULT
    assert failed.user_attrs["fail_reason"].startswith("GpuMemoryError: out of GPU memory on cpu")
    queued = [t for t in _trials(url) if t.state == TrialState.WAITING]
    assert len(queued) == 2 and failed.user_attrs["point"] in {t.user_attrs["point"] for t in queued}

    # With max_retries = 0 a configuration's own error would have given the point up; this one is run
    # again, from the epoch it had finished, and the study finishes with each point once.
    trained = _out_of_memory_at(monkeypatch, 2, CROWDED, times=0)
    assert Worker(spec, options).run().stopped == "finished"
    assert points_finished(optuna.load_study(study_name="oom", storage=url)) == {
        point_key({"hidden_size": 4}): 1, point_key({"hidden_size": 8}): 1}
    assert sorted(trained) == [1, 2, 2]  # the requeued point resumed after its checkpointed epoch 1


def test_a_configuration_too_large_on_its_own_is_given_up_like_any_error(study, tmp_path, monkeypatch):
    spec, url = study
    options = WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False)
    _out_of_memory_at(monkeypatch, 1, ALONE)
    summary = Worker(spec, options).run()  # the worker goes on with the next configuration
    assert summary.stopped == "finished" and dict(summary.states) == {"FAIL": 1, "COMPLETE": 1}
    failed = next(t for t in _trials(url) if t.state == TrialState.FAIL)
    assert failures.kind(failed.user_attrs) == failures.ERROR
    assert failed.user_attrs["fail_reason"].startswith("TrainingError: out of GPU memory on cpu")


@pytest.fixture
def launch_with_one_worker_out_of_memory(tmp_path, monkeypatch):
    """`launch` whose first worker exits as a worker on a crowded card does (exit code 6)."""
    real_start = launcher.start

    def start(plan):
        crowded_out = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({GpuMemoryError.exit_code})"])
        rest = real_start(dataclasses.replace(plan, workers=plan.workers - 1)) if plan.workers > 1 else []
        return [crowded_out, *rest]

    monkeypatch.setattr(launcher, "start", start)
    monkeypatch.chdir(tmp_path)


def test_launch_goes_on_without_a_worker_that_gave_its_gpu_to_the_others(
        launch_with_one_worker_out_of_memory, tmp_path, tiny_csv):
    path = write_study(tmp_path / "oom.toml", name="oom", data=tiny_csv, search="hidden_size = [4, 8]")
    result = CliRunner().invoke(app, ["launch", str(path), "--workers", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "note: worker(s) 0 ran out of GPU memory and stopped, leaving the GPU to the others" in result.output
    assert "param.hidden_size" in result.output  # the leaderboard of the finished study


def test_launch_says_when_the_study_is_left_unfinished(launch_with_one_worker_out_of_memory, tmp_path, tiny_csv):
    path = write_study(tmp_path / "oom.toml", name="oom", data=tiny_csv, search="hidden_size = [4, 8]")
    assert CliRunner().invoke(app, ["worker", str(path), "--device", "cpu", "-q", "--n-trials", "1"]).exit_code == 0
    result = CliRunner().invoke(app, ["launch", str(path), "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 1
    assert ("error: oom: 1/2 configurations done when the last worker stopped; run the same command again with "
            "fewer workers per GPU to finish it") in result.output
    assert "Traceback" not in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_memory_readings_tell_a_crowded_card_from_a_configuration_too_large():
    cuda = torch.device("cuda")
    # Another process takes all but 512 MiB of the card, as seven other workers would.
    hog = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch\n"
        "free, _ = torch.cuda.mem_get_info()\n"
        "held = torch.empty(free - 512 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "ready"
        with pytest.raises(GpuMemoryError, match="other processes hold"), gpumemory.blamed(cuda):
            torch.empty(2 * GIB, dtype=torch.uint8, device=cuda)
    finally:
        hog.communicate("", timeout=60)
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info()
    mine = torch.empty(4 * GIB, dtype=torch.uint8, device=cuda)
    with pytest.raises(TrainingError, match="this configuration does not fit"), gpumemory.blamed(cuda):
        torch.empty(total, dtype=torch.uint8, device=cuda)
    del mine
    torch.cuda.empty_cache()


def test_a_trials_peak_gpu_memory_is_stored_and_reported_and_none_off_cuda(study, tmp_path, tiny_corpus):
    from vadsearch.report import trials_frame

    assert fit(TINY_LSTM, tiny_corpus, device="cpu").peak_gpu_mib is None
    spec, url = study
    Worker(spec, WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False,
                               n_trials=1)).run()
    [done] = [t for t in _trials(url) if t.state == TrialState.COMPLETE]
    assert "peak_gpu_mib" in done.user_attrs and done.user_attrs["peak_gpu_mib"] is None
    frame = trials_frame(optuna.load_study(study_name="oom", storage=url))
    assert "peak_gpu_mib" in frame.columns


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_peak_gpu_memory_is_each_trials_own(tiny_corpus):
    large = fit(dataclasses.replace(TINY_LSTM, hidden_size=1024, embedding_dim=512, max_epochs=1), tiny_corpus,
                device="cuda")
    small = fit(dataclasses.replace(TINY_LSTM, max_epochs=1), tiny_corpus, device="cuda")
    total_mib = torch.cuda.mem_get_info()[1] / 2**20
    assert 0 < small.peak_gpu_mib < large.peak_gpu_mib < total_mib  # reset between trials of one process
