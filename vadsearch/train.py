"""The epoch loop: train, evaluate on dev, checkpoint, repeat; then report the best epoch on test once.

The best epoch on dev is the run's result (the report's "number of epochs" hyperparameter). The test
split is touched only after training, with the best epoch's weights, for reporting.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vadsearch import interrupts
from vadsearch.batching import collate, eval_batches, train_batches
from vadsearch.checkpoint import BackgroundWriter, RunDirectory
from vadsearch.config import TrainConfig, check_device
from vadsearch.data import Corpus
from vadsearch.encoding import EncodedCorpus, EncodedSplit, encode_corpus
from vadsearch.errors import ConfigError, TrainingError
from vadsearch.gpumemory import blamed, peak_mib, reset_peak
from vadsearch.metrics import score, train_means
from vadsearch.results import EpochCallback, EpochResult, RunResult
from vadsearch.seeding import capture_rng, restore_rng, seed_everything
from vadsearch.step import Step, autocast, make_step

log = logging.getLogger(__name__)




def resolve_device(name: str = "auto") -> torch.device:
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but this machine has no CUDA GPU: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # Caught here, once, rather than as an invalid device ordinal that fails every trial of a study.
        count = torch.cuda.device_count()
        raise ConfigError(f"device {name} asked for, but this process sees {count} CUDA GPU(s), cuda:0 to "
                          f"cuda:{count - 1} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name} asked for, but this machine has no Apple MPS device: use --device cpu")
    return device


def describe_device(device: torch.device) -> str:
    """For a worker's log: which GPU this process trains on, among those it was given."""
    if device.type != "cuda":
        return str(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""
    return f"{device} ({torch.cuda.get_device_name(device)}{shown})"


def predict(model: nn.Module, split: EncodedSplit, batch_size: int, device: torch.device) -> np.ndarray:
    """(n, 3) predictions in row order, clipped to the rating scale [1, 5]."""
    if len(split) == 0:
        return np.empty((0, 3), dtype=np.float32)
    was_training = model.training
    model.eval()
    batches = eval_batches(split.lengths, batch_size)
    outputs = []
    with torch.inference_mode(), autocast(device):
        for rows in batches:
            ids, lengths, _ = collate(split, rows, device)
            outputs.append(model(ids, lengths).float())
    model.train(was_training)
    ordered = torch.cat(outputs).cpu().numpy()  # one device→host copy per evaluation
    predictions = np.empty_like(ordered)
    predictions[np.concatenate(batches)] = ordered
    return np.clip(predictions, 1.0, 5.0)


def _optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # Fused kernels update every parameter in a few launches instead of several per tensor.
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.max_epochs * steps_per_epoch
    warmup = int(config.warmup_ratio * total)

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_epoch(run: _Run, step: Step, epoch: int, progress: bool,
                 after_step: Callable[[], None] | None = None) -> float:
    model, split, optimizer, scheduler = run.model, run.encoded.train, run.optimizer, run.scheduler
    config, device = run.config, run.device
    model.train()
    # Each epoch's order depends only on (seed, epoch): a resumed run sees the same batches.
    batches = train_batches(split.lengths, config.batch_size, np.random.default_rng([config.seed, epoch]))
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)  # summed on the device: no host sync per step
    for rows in _bar(batches, progress, f"epoch {epoch}/{config.max_epochs}"):
        interrupts.stop_point()  # Ctrl-C, held since the last step (see `train`)
        loss = step(*collate(split, rows, device))
        if config.grad_clip:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss * len(rows)
        if after_step:
            after_step()
    return (total / len(split)).item()


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    # disable=None: drawn on a terminal only, so a worker's log file holds its log lines, not redraws.
    return tqdm(items, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)


def _epochs_to_keep(history: list[dict[str, Any]], config: TrainConfig) -> int:
    """How many of a checkpoint's epochs a run of `config` trains before it ends: `max_epochs` and
    `patience` are not in the fingerprint, so the checkpoint may come from a run allowed more of either."""
    best = 0
    for h in history[: config.max_epochs]:
        best = h["epoch"] if h["best"] else best
        if config.out_of_patience(h["epoch"], best):
            return h["epoch"]
    return min(len(history), config.max_epochs)


@dataclass
class _Run:
    """What one run trains and carries from epoch to epoch: exactly what its checkpoints save."""

    config: TrainConfig
    data_sha256: str
    encoded: EncodedCorpus
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_model: dict[str, torch.Tensor] | None = None

    def restore(self, checkpoint: dict[str, Any], epochs: int) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng(checkpoint["rng"], self.device)
        self.history = [EpochResult.from_dict(h) for h in checkpoint["history"]][:epochs]
        self.best_epoch, self.best_model = checkpoint["best_epoch"], checkpoint["best_model"]

    def checkpoint(self) -> dict[str, Any]:
        return {
            "fingerprint": self.config.fingerprint(),
            "data_sha256": self.data_sha256,
            "config": self.config.to_dict(),
            "epoch": len(self.history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(self.device),
            "history": [h.as_dict() for h in self.history],
            "best_epoch": self.best_epoch,
            "vocab": list(self.encoded.vocab.itos) if self.encoded.vocab else None,
        }

    def stopped_early(self) -> bool:
        return self.config.out_of_patience(len(self.history), self.best_epoch)


def _epochs(run: _Run, writer: BackgroundWriter | None, on_epoch: EpochCallback | None, progress: bool) -> bool:
    """Train the epochs still to do; return whether patience ran out."""
    config = run.config
    unreported: list[EpochResult] = []  # trained, checkpoint still being written
    step = make_step(run.model, run.device)  # built once: a graphed step keeps its graphs across epochs

    def report_written() -> None:
        # An epoch is reported once its checkpoint is on disk, so a reported epoch is never lost to a
        # kill; until then training goes on. Checked between steps: a report may prune the run.
        if writer:
            writer.check()
        while unreported and (writer is None or unreported[0].epoch <= writer.written):
            done = unreported.pop(0)
            if on_epoch:
                on_epoch(done)

    for epoch in range(len(run.history) + 1, config.max_epochs + 1):
        if run.stopped_early():
            break
        epoch_started = time.perf_counter()
        loss = _train_epoch(run, step, epoch, progress, report_written if unreported else None)
        dev = score(predict(run.model, run.encoded.dev, config.eval_batch_size, run.device),
                    run.encoded.dev.targets)
        if not (math.isfinite(loss) and math.isfinite(dev.mse)):
            raise TrainingError(f"training diverged at epoch {epoch} (loss {loss}): lower the learning rate")
        previous_best = run.best_epoch
        improved = run.best_epoch == 0 or dev.mse < run.history[run.best_epoch - 1].dev.mse
        if improved:
            run.best_epoch = epoch
            run.best_model = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        run.history.append(EpochResult(epoch, loss, dev, time.perf_counter() - epoch_started, improved))
        if writer:
            writer.save(run.checkpoint(), run.best_model if improved else None, previous_best)
        unreported.append(run.history[-1])
        report_written()
    if writer:
        writer.wait()
    report_written()
    return run.stopped_early()


def train(
    config: TrainConfig,
    corpus: Corpus,
    *,
    run_dir: str | Path | None = None,
    device: str = "auto",
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
    on_resume: Callable[[int], None] | None = None,
) -> RunResult:
    """Train `config` on `corpus`, resuming from the checkpoints in `run_dir` when there are any.

    Checkpoints are written on a thread while the next epoch trains. `on_epoch` runs once an epoch's
    checkpoint is on disk (between the next epoch's steps, or at the end), so an exception it raises
    (a pruned trial, Ctrl-C) leaves the run resumable from that epoch, and no reported epoch is ever
    lost. Epochs restored from a checkpoint are passed to it first (with `restored=True`), so a caller
    that records per-epoch values loses none. `on_resume(n)` follows them when n > 0 epochs were restored:
    said at once, not when the next epoch (minutes of BERT) ends.
    """
    if config.model == "baseline":
        raise ValueError("the constant baseline trains nothing: fit it with vadsearch.fit.fit")
    started = time.perf_counter()
    dev_device = resolve_device(device)
    if dev_device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 where fp32 remains
    reset_peak(dev_device)  # a worker trains one trial after another in one process
    # A stop signal is raised at the stop points below, never inside torch (see interrupts.py). With several
    # workers on one GPU, running out of memory may be the card's fault, not the trial's.
    with interrupts.deferred(), blamed(dev_device):
        return _train_on(dev_device, config, corpus, run_dir, on_epoch, progress, started, on_resume)


def _train_on(
    dev_device: torch.device,
    config: TrainConfig,
    corpus: Corpus,
    run_dir: str | Path | None,
    on_epoch: EpochCallback | None,
    progress: bool,
    started: float,
    on_resume: Callable[[int], None] | None = None,
) -> RunResult:
    seed_everything(config.seed)
    encoded = encode_corpus(config, corpus)
    interrupts.stop_point()
    from vadsearch.models import build_model, trainable_parameters

    model = build_model(config, encoded, train_means(corpus)).to(dev_device)
    names, n_trainable, n_total = trainable_parameters(model)
    if n_trainable == 0:
        raise ConfigError("nothing to train: every parameter is frozen")
    optimizer = _optimizer(config, model, dev_device)
    scheduler = _scheduler(config, optimizer, math.ceil(len(encoded.train) / config.batch_size))

    run = _Run(config, corpus.sha256, encoded, model, optimizer, scheduler, dev_device)
    directory = RunDirectory(run_dir) if run_dir is not None else None
    checkpoint = directory.load(config.fingerprint(), corpus.sha256, config.differences) if directory else None
    keep = _epochs_to_keep(checkpoint["history"], config) if checkpoint else 0
    if checkpoint and checkpoint["best_epoch"] > keep:
        # Trained further than this run would (a larger max_epochs, or a patience that ran out later),
        # and its best epoch lies beyond where this run ends: those weights are not what it would produce.
        directory.discard(f"their best epoch {checkpoint['best_epoch']} is beyond epoch {keep}, where a run of "
                          f"max_epochs {config.max_epochs} and patience {config.patience} ends")
        checkpoint = None
    if checkpoint:
        run.restore(checkpoint, keep)
    resumed_from = len(run.history)
    for restored in run.history:
        if on_epoch:
            on_epoch(dataclasses.replace(restored, restored=True))
    if on_resume and resumed_from:
        on_resume(resumed_from)

    interrupts.stop_point()
    writer = BackgroundWriter(directory) if directory else None
    try:
        stopped_early = _epochs(run, writer, on_epoch, progress)
    except BaseException:
        if writer:
            try:
                writer.wait()  # the last epoch that was saved stays resumable
            except Exception as exc:
                log.warning("the last checkpoint was not written either: %s", exc)
        raise

    model.load_state_dict(run.best_model)
    test = None
    if len(encoded.test):
        test = score(predict(model, encoded.test, config.eval_batch_size, dev_device), encoded.test.targets)
    return RunResult(
        config=config,
        best_epoch=run.best_epoch,
        dev=run.history[run.best_epoch - 1].dev,
        test=test,
        history=tuple(run.history),
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        trainable_params=n_trainable,
        total_params=n_total,
        trainable_names=tuple(names),
        # The restored epochs' own seconds too: a run resumed after Ctrl-C took all of them.
        seconds=time.perf_counter() - started + sum(e.seconds for e in run.history[:resumed_from]),
        peak_gpu_mib=peak_mib(dev_device),
    )
