"""Fit any configuration: the constant baseline without loading torch, a model through `train.train`.

A worker whose study only holds baselines never imports torch, so it starts in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vadsearch.config import TrainConfig, check_device
from vadsearch.results import RunResult, constant_baseline

if TYPE_CHECKING:
    from vadsearch.data import Corpus


def fit(config: TrainConfig, corpus: Corpus, **training: Any) -> RunResult:
    """`training` (run_dir, device, on_epoch, progress, on_resume) goes to `train.train`; a baseline only checks the
    device's name."""
    if config.model == "baseline":
        check_device(training.get("device", "auto"))
        return constant_baseline(config, corpus)
    from vadsearch.train import train

    return train(config, corpus, **training)
