"""Out of GPU memory with several workers on one card: the card's fault stops the worker and spends no
retry; a configuration too large on its own is its own error. Run on the CPU, with torch's OutOfMemoryError
raised where a GPU would raise it and the card's memory readings given."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import traceback

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
    error = gpumemory.blame("cuda:0", free=CROWDED[0], total=CROWDED[1], own=CROWDED[2], requested=20 * 2**20)
    assert isinstance(error, GpuMemoryError) and isinstance(error, MachineFault)
    assert "other processes hold 62.0 GiB of its 80.0 GiB, this one 10.0 GiB, and it asked for 0.02 GiB more" in str(
        error)
    assert "too many processes share this GPU" in str(error) and "--workers-per-gpu" in str(error)


def test_an_allocation_larger_than_the_card_is_the_configurations_even_on_a_crowded_card():
    error = gpumemory.blame("cuda:0", free=CROWDED[0], total=CROWDED[1], own=CROWDED[2], requested=75 * GIB)
    assert isinstance(error, TrainingError) and "this configuration does not fit" in str(error)
    message = "CUDA out of memory. Tried to allocate 75.00 GiB. GPU 0 has a total capacity of 79.11 GiB"
    assert gpumemory.requested_bytes(message) == 75 * GIB
    assert gpumemory.requested_bytes("CUDA error: out of memory") is None


@pytest.mark.parametrize("raised", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("CUDA error: out of memory"),  # a context or a launch, on a full card
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),  # the LSTM's RNN workspace
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_every_way_torch_says_out_of_memory_gets_a_verdict(monkeypatch, raised):
    monkeypatch.setattr(gpumemory, "readings", lambda device: CROWDED)
    with pytest.raises(GpuMemoryError) as caught, gpumemory.blamed(torch.device("cuda:0")):
        raise raised
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(RuntimeError, match="size mismatch"), gpumemory.blamed(torch.device("cuda:0")):
        raise RuntimeError("size mismatch")  # not about memory: passes unchanged


def test_a_configuration_too_large_on_its_own_is_its_error():
    error = gpumemory.blame("cuda:1", free=ALONE[0], total=ALONE[1], own=ALONE[2])
    assert isinstance(error, TrainingError) and not isinstance(error, MachineFault)
    assert "other processes hold 1.0 GiB of its 80.0 GiB, this one 71.0 GiB" in str(error)
    assert "lower batch_size" in str(error)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_out_of_host_memory_is_the_configurations_error_on_any_device(device):
    message = ("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
               "to allocate 12800000000000 bytes. Error code 12 (Cannot allocate memory)")
    with pytest.raises(TrainingError, match=r"^out of this machine's memory \(11,920.9 GiB at once\); this "
                                            "configuration does not fit"), gpumemory.blamed(torch.device(device)):
        raise RuntimeError(message)


def test_off_cuda_the_error_passes_unchanged():
    with pytest.raises(torch.OutOfMemoryError, match="as it was"), gpumemory.blamed(torch.device("cpu")):
        raise torch.OutOfMemoryError("as it was")
    with pytest.raises(ValueError), gpumemory.blamed(torch.device("cpu")):
        raise ValueError("not about memory")


def _out_of_memory_at(monkeypatch, epoch: int, card: tuple[int, int, int], times: int = 1,
                      hidden_size: int | None = None) -> list[int]:
    """Training raises torch's OutOfMemoryError in epoch `epoch` (the first `times` times it gets there, in
    any configuration or only in that of `hidden_size`), on a card whose memory reads `card`. Returns the
    epochs trained."""
    real = train_module._train_epoch
    trained, raised = [], []

    def train_epoch(run, step, at, *args):
        chosen = hidden_size is None or run.config.hidden_size == hidden_size
        if at == epoch and chosen and len(raised) < times:
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
    with pytest.raises(TrainingError, match="this one 71.0 GiB, and it asked for 0.02 GiB more; this configuration "
                                            "does not fit"):
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
    with pytest.raises(GpuMemoryError, match="this worker stops so that the others can go on") as caught:
        Worker(spec, options).run()
    # What the worker raised and keeps holds none of the failed trial's frames (and so none of its tensors).
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(caught.value.__traceback__)]
    assert caught.value.__context__ is None and "_train_epoch" not in frames and "_train_on" not in frames
    [failed] = [t for t in _trials(url) if t.state == TrialState.FAIL]
    assert failures.kind(failed.user_attrs) == failures.MACHINE_FAULT and failures.gave_way(failed.user_attrs)
    assert failed.user_attrs["fail_reason"].startswith("GpuMemoryError: out of GPU memory on cpu")
    assert failed.user_attrs["fail_reason"].endswith("its trial is queued again without spending a retry")
    queued = [t for t in _trials(url) if t.state == TrialState.WAITING]
    assert len(queued) == 2 and failed.user_attrs["point"] in {t.user_attrs["point"] for t in queued}

    # With max_retries = 0 a configuration's own error would have given the point up; this one is run
    # again, from the epoch it had finished, and the study finishes with each point once.
    trained = _out_of_memory_at(monkeypatch, 2, CROWDED, times=0)
    assert Worker(spec, options).run().stopped == "finished"
    assert points_finished(optuna.load_study(study_name="oom", storage=url)) == {
        point_key({"hidden_size": 4}): 1, point_key({"hidden_size": 8}): 1}
    assert sorted(trained) == [1, 2, 2]  # the requeued point resumed after its checkpointed epoch 1


def test_a_configuration_out_of_memory_on_a_crowded_card_twice_is_its_own_error(study, tmp_path, monkeypatch):
    # Eight workers on a card and a configuration too large for a share of it: the first worker that
    # takes it gives way, the next one counts it as the configuration's error and goes on.
    spec, url = study
    options = WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False)
    _out_of_memory_at(monkeypatch, 2, CROWDED, times=2, hidden_size=4)
    with pytest.raises(GpuMemoryError):
        Worker(spec, options).run()
    summary = Worker(spec, options).run()
    assert summary.stopped == "finished" and dict(summary.states) == {"FAIL": 1, "COMPLETE": 1}
    first, second = [t for t in _trials(url) if t.state == TrialState.FAIL]
    assert first.user_attrs["point"] == second.user_attrs["point"]
    assert failures.kind(second.user_attrs) == failures.ERROR  # max_retries = 0: given up, not requeued
    assert second.user_attrs["fail_reason"].startswith("TrainingError: out of GPU memory on cpu")
    assert "ran out of GPU memory on a shared card before too" in second.user_attrs["fail_reason"]
    assert not [t for t in _trials(url) if t.state == TrialState.WAITING]


def test_a_worker_hands_each_trials_cached_memory_back_when_it_ends(study, tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(gpumemory, "release", released.append)
    spec, url = study
    Worker(spec, WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False)).run()
    assert released == [torch.device("cpu")] * 2  # after each of the two trials, before any wait


def test_memory_is_released_and_peaks_reset_only_once_cuda_is_initialised(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(f"reset {device}"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    # Before CUDA is initialised the allocator knows no device: resetting cuda:1 would fail, and nothing
    # is held or counted yet anyway.
    gpumemory.reset_peak(torch.device("cuda:1"))
    gpumemory.release(torch.device("cuda:1"))
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    gpumemory.reset_peak(torch.device("cuda:1"))
    gpumemory.release(torch.device("cpu"))
    assert calls == ["empty_cache", "reset cuda:1"]


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
    assert "(next time, fewer --workers)" in result.output  # no --gpus here: --workers-per-gpu would be refused
    # Said when it happened, too: the study may run for days after it.
    assert re.search(r"\d\d:\d\d:\d\d worker 0 ran out of GPU memory and left the GPU to the others; the others "
                     r"go on\n", result.stderr)
    assert "param.hidden_size" in result.output  # the leaderboard of the finished study


def test_launch_says_when_the_study_is_left_unfinished(launch_with_one_worker_out_of_memory, tmp_path, tiny_csv):
    path = write_study(tmp_path / "oom.toml", name="oom", data=tiny_csv, search="hidden_size = [4, 8]")
    assert CliRunner().invoke(app, ["worker", str(path), "--device", "cpu", "-q", "--n-trials", "1"]).exit_code == 0
    result = CliRunner().invoke(app, ["launch", str(path), "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 1
    assert ("error: oom: 1/2 configurations done when the last worker here stopped; other processes fill the "
            "GPU: free it, then run the same command again") in result.output
    assert "Traceback" not in result.output


def test_what_launch_says_when_its_workers_gave_way_before_the_study_finished():
    assert launcher.unfinished("bert", 6, 6, 0, workers=8, gave_way=3, gpus=1) is None
    # Five of eight fitted beside the others: that is the number to launch again.
    code, message = launcher.unfinished("bert", 4, 6, 0, workers=8, gave_way=3, gpus=1)
    assert code == 1 and message.endswith("run it again with --workers-per-gpu 5 to finish the study")
    code, message = launcher.unfinished("bert", 4, 6, 0, workers=16, gave_way=16, gpus=2)
    assert code == 1 and "--workers-per-gpu 1 " in message
    # Launched without --gpus (on the default device): --workers-per-gpu would be refused.
    code, message = launcher.unfinished("bert", 4, 6, 0, workers=8, gave_way=3, gpus=0)
    assert code == 1 and message.endswith("run it again with --workers 5 to finish the study")
    # Workers elsewhere still hold trials of the study: no failure, so a supervisor does not restart this
    # launch into the same crowd (compose's `restart: on-failure`).
    code, message = launcher.unfinished("bert", 4, 6, 2, workers=8, gave_way=8, gpus=1)
    assert code == 0 and message == ("note: bert: 4/6 configurations done when the last worker here stopped; "
                                     "2 trial(s) run on elsewhere (`vadsearch status` shows them)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_memory_readings_tell_a_crowded_card_from_a_configuration_too_large():
    cuda = torch.device("cuda")
    torch.zeros(1, device=cuda)  # this process's own CUDA context first: it would not fit afterwards
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
