"""Epoch checkpoints: atomic writes, rotation, and verification before a run resumes from them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vadsearch import checkpoint
from vadsearch.checkpoint import RunDirectory
from vadsearch.errors import CheckpointError
from vadsearch.outdir import temporary_for
from vadsearch.seeding import capture_rng, restore_rng

FP, SHA = "fingerprint-a", "data-a"


def _state(epoch: int, best_epoch: int, fingerprint: str = FP, data_sha256: str = SHA) -> dict:
    return {
        "fingerprint": fingerprint,
        "data_sha256": data_sha256,
        "epoch": epoch,
        "best_epoch": best_epoch,
        "model": {"w": torch.full((4,), float(epoch))},
        "history": [{"epoch": e, "dev": float(10 - e)} for e in range(1, epoch + 1)],
        "rng": capture_rng(),
    }


def _weights(epoch: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), 100.0 + epoch)}


def _run(run: RunDirectory, improved: list[bool], fingerprint: str = FP, data_sha256: str = SHA) -> None:
    """Save epochs 1..len(improved) as train() does: best weights on an improvement."""
    best = 0
    for epoch, better in enumerate(improved, start=1):
        previous_best = best
        if better or best == 0:
            best = epoch
        run.save(_state(epoch, best, fingerprint, data_sha256), _weights(epoch) if best == epoch else None, previous_best)


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_round_trip(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")  # created on the first save
    assert run.load(FP, SHA) is None
    state = _state(1, 1)
    run.save(state, _weights(1), previous_best=0)
    loaded = run.load(FP, SHA)
    assert loaded is not None
    assert loaded["epoch"] == 1 and loaded["best_epoch"] == 1 and loaded["history"] == state["history"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["best_model"]["w"], _weights(1)["w"])
    assert torch.equal(run.best_model(1)["w"], _weights(1)["w"])
    assert loaded["format"] == checkpoint.FORMAT


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    run.save(_state(1, 1), _weights(1), 0)  # captures the RNG state now
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(run.load(FP, SHA)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_cuda_run_saves_its_own_gpu_generator_and_resumes_it_on_the_gpu_it_lands_on(monkeypatch) -> None:
    # Stand-ins for CUDA's generator calls: a run saved by a worker on cuda:1 and resumed by one on cuda:0
    # must hand cuda:0 the generator cuda:1 had, not cuda:0's own (what restoring every GPU by position did).
    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generators[device.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: generators.__setitem__(device.index, state))
    saved = capture_rng(torch.device("cuda", 1))
    generators[1] = torch.tensor([7], dtype=torch.uint8)  # drawn on after the save
    restore_rng(saved, torch.device("cuda", 0))
    assert generators[0].tolist() == [1] and generators[1].tolist() == [7]
    assert "cuda_device" not in capture_rng(torch.device("cpu"))  # a CPU run has no GPU generator to keep


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_generator_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    run, last = RunDirectory(tmp_path), torch.device("cuda", torch.cuda.device_count() - 1)
    torch.manual_seed(3)
    state = _state(1, 1)
    state["rng"] = capture_rng(last)
    run.save(state, _weights(1), 0)
    expected = torch.rand(4, device=last).tolist()
    torch.manual_seed(99)
    first = torch.device("cuda", 0)  # the same GPU on a one-GPU machine, another one where there are more
    restore_rng(run.load(FP, SHA)["rng"], first)
    assert torch.rand(4, device=first).tolist() == expected


def test_newest_checkpoint_wins(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, False, True])
    loaded = run.load(FP, SHA)
    assert loaded["epoch"] == 3 and loaded["best_epoch"] == 3
    assert torch.equal(loaded["best_model"]["w"], _weights(3)["w"])


def test_rotation_keeps_two_epochs_and_the_best_weights_they_name(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, False])
    assert _names(tmp_path) == {"epoch-0001.pt", "epoch-0002.pt", "best-0001.pt"}
    _run(run, [True, False, True])  # epoch 3 improves: epoch-0002 still names best-0001
    assert _names(tmp_path) == {"epoch-0002.pt", "epoch-0003.pt", "best-0001.pt", "best-0003.pt"}
    _run(run, [True, False, True, False, False])
    assert _names(tmp_path) == {"epoch-0004.pt", "epoch-0005.pt", "best-0003.pt"}
    _run(run, [True, False, True, False, False, True, True])
    assert _names(tmp_path) == {"epoch-0006.pt", "epoch-0007.pt", "best-0006.pt", "best-0007.pt"}


def test_every_kept_epoch_can_be_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The fallback is real: remove the newest and the one before must load with its own best weights.
    run = RunDirectory(tmp_path)
    _run(run, [True, False, True, True, False])
    (tmp_path / "epoch-0005.pt").unlink()
    loaded = run.load(FP, SHA)
    assert loaded["epoch"] == 4 and torch.equal(loaded["best_model"]["w"], _weights(4)["w"])
    assert not _warnings(caplog)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _other_fingerprint(path: Path) -> None:
    torch.save({**_state(3, 3, fingerprint="fingerprint-b"), "format": checkpoint.FORMAT}, path)


def _other_data(path: Path) -> None:
    torch.save({**_state(3, 3, data_sha256="data-b"), "format": checkpoint.FORMAT}, path)


def _not_a_checkpoint(path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, path)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, "unreadable"),
        (_random_bytes, "unreadable"),
        (_empty, "unreadable"),
        (_other_fingerprint, "another configuration"),
        (_other_data, "other data"),
        (_not_a_checkpoint, "not a vadsearch checkpoint"),
    ],
)
def test_bad_newest_checkpoint_falls_back_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, problem: str
) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, True, True])
    damage(tmp_path / "epoch-0003.pt")
    caplog.set_level(logging.WARNING)
    loaded = run.load(FP, SHA)
    assert loaded is not None and loaded["epoch"] == 2
    assert torch.equal(loaded["best_model"]["w"], _weights(2)["w"])
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "epoch-0003.pt" in warnings[0].getMessage() and problem in warnings[0].getMessage()
    assert "epoch-0003.pt.rejected" in _names(tmp_path) and "epoch-0003.pt" not in _names(tmp_path)
    # Reported once: the next load sees only the good checkpoint, silently.
    caplog.clear()
    assert run.load(FP, SHA)["epoch"] == 2
    assert not _warnings(caplog)


@pytest.mark.parametrize("damage", [_truncate, _other_fingerprint, _other_data])
def test_only_checkpoint_bad_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True])
    damage(tmp_path / "epoch-0001.pt")
    caplog.set_level(logging.WARNING)
    assert run.load(FP, SHA) is None
    assert len(_warnings(caplog)) == 1
    assert "epoch-0001.pt.rejected" in _names(tmp_path)


def test_a_run_of_another_configuration_is_not_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, True])
    caplog.set_level(logging.WARNING)
    assert run.load("fingerprint-b", SHA) is None
    # One warning for the run's two files: the same reason twice is noise in a long worker log.
    assert [r.getMessage() for r in _warnings(caplog)] == [
        f"checkpoints epoch-0002.pt, epoch-0001.pt in {tmp_path} rejected: it belongs to another configuration; "
        "starting over"]
    assert run.load(FP, SHA) is None  # renamed: they are no longer candidates for anyone


def test_missing_best_weights_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, True])
    (tmp_path / "best-0002.pt").unlink()
    caplog.set_level(logging.WARNING)
    assert run.load(FP, SHA)["epoch"] == 1
    assert len(_warnings(caplog)) == 1


def test_best_weights_of_another_run_are_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, True])
    torch.save({"format": 1, "epoch": 2, "fingerprint": "fingerprint-b", "model": _weights(2)}, tmp_path / "best-0002.pt")
    caplog.set_level(logging.WARNING)
    assert run.load(FP, SHA)["epoch"] == 1
    assert "best weights belong to another run" in caplog.text


def test_unrelated_files_are_ignored(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "epoch-12.pt").write_text("too few digits: not ours")
    _run(run, [True])
    assert run.load(FP, SHA)["epoch"] == 1
    assert {"notes.txt", "epoch-12.pt"} <= _names(tmp_path)


def _interrupted_write(run: RunDirectory, epoch: int, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Start writing epoch `epoch`'s checkpoint and stop it between the write and the rename, as a kill
    does; return the temporary file it leaves."""
    before = _names(run.path) if run.path.is_dir() else set()

    @contextlib.contextmanager
    def killed_before_the_rename(path: Path):
        yield temporary_for(path)
        raise KeyboardInterrupt  # as a kill: nothing after the write runs, the temporary file stays

    monkeypatch.setattr(checkpoint, "replacing", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        run.save(_state(epoch, epoch), None, 0)
    monkeypatch.undo()
    (left,) = _names(run.path) - before
    return run.path / left


def test_temporary_files_of_killed_writes_are_swept_once_stale(tmp_path: Path, monkeypatch) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True])
    stale = _interrupted_write(run, 2, monkeypatch)
    old = stale.stat().st_mtime - checkpoint.STALE_TEMPORARY_S - 60
    os.utime(stale, (old, old))
    in_flight = _interrupted_write(run, 3, monkeypatch)  # as fresh as a write still going on elsewhere
    (tmp_path / "notes.tmp").write_text("not ours")
    os.utime(tmp_path / "notes.tmp", (old, old))

    assert run.load(FP, SHA)["epoch"] == 1  # resuming sweeps
    assert not stale.exists() and in_flight.exists() and (tmp_path / "notes.tmp").exists()
    later = in_flight.stat().st_mtime + checkpoint.STALE_TEMPORARY_S + 1
    assert run.sweep_temporaries(now=later) == [in_flight]


def test_epoch_numbers_sort_numerically(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    run.save(_state(9999, 9999), _weights(9999), 0)
    run.save(_state(10000, 10000), _weights(10000), 9999)  # five digits
    assert run.load(FP, SHA)["epoch"] == 10000


# ------------------------------------------------------------------------------------- write failures


def _no_temp_files(path: Path) -> bool:
    return not [name for name in _names(path) if name.endswith(".tmp") or name.startswith(".")]


def test_read_only_directory(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    _run(run, [True])
    run.path.chmod(0o500)
    try:
        if os.access(run.path, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*epoch-0002\.pt: Permission denied"):
            run.save(_state(2, 1), None, 1)
        assert _no_temp_files(run.path)
    finally:
        run.path.chmod(0o700)
    assert run.load(FP, SHA)["epoch"] == 1


def test_permission_denied_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-only case where chmod cannot show it (root): opening the temporary file fails."""
    run = RunDirectory(tmp_path)
    _run(run, [True])

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*epoch-0002\.pt: Permission denied"):
        run.save(_state(2, 1), None, 1)
    monkeypatch.undo()
    assert _no_temp_files(tmp_path) and run.load(FP, SHA)["epoch"] == 1


def test_rejecting_in_a_read_only_directory_still_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True, True])
    _truncate(tmp_path / "epoch-0002.pt")

    def read_only(self, target):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "replace", read_only)
    caplog.set_level(logging.WARNING)
    assert run.load(FP, SHA)["epoch"] == 1
    assert len(_warnings(caplog)) == 1
    assert "epoch-0002.pt" in _names(tmp_path)  # left in place, rejected again next time


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(CheckpointError, match="cannot create checkpoint directory"):
        RunDirectory(blocker / "run").save(_state(1, 1), _weights(1), 0)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["torch.save", "os.fsync", "os.replace"])
def test_disk_full_is_a_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    run = RunDirectory(tmp_path)
    _run(run, [True])
    module, name = where.split(".")
    monkeypatch.setattr({"torch": torch, "os": os}[module], name, _disk_full)
    with pytest.raises(CheckpointError) as info:
        run.save(_state(2, 2), _weights(2), 1)
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message and "free disk space" in message
    assert "best-0002.pt" in message  # the best weights are written first
    assert _no_temp_files(tmp_path)
    # The previous checkpoint is untouched and still resumes.
    assert run.load(FP, SHA)["epoch"] == 1
    assert _names(tmp_path) == {"epoch-0001.pt", "best-0001.pt"}


def test_torch_save_failure_is_chained_into_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(CheckpointError) as info:
        checkpoint.atomic_save({"a": 1}, tmp_path / "x.pt")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # `from None`: one clean line
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ security


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_rejected_without_running_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDirectory(tmp_path / "run")
    _run(run, [True])
    marker = tmp_path / "pwned"
    state = {**_state(2, 1), "format": checkpoint.FORMAT, "payload": _Exploit(marker)}
    torch.save(state, run.path / "epoch-0002.pt")
    assert not marker.exists()  # saving alone runs nothing
    caplog.set_level(logging.WARNING)
    assert run.load(FP, SHA)["epoch"] == 1
    assert not marker.exists()
    assert len(_warnings(caplog)) == 1 and "unreadable" in caplog.text


def test_best_weights_that_would_run_code_never_run(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": _Exploit(marker)}, tmp_path / "best-0001.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        run.best_model(1)
    assert not marker.exists()
