"""Fit any configuration: the constant baseline without loading torch, a model through `train.train`.

A worker whose study only holds baselines never imports torch, so it starts in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vadsearch.results import RunResult, constant_baseline

if TYPE_CHECKING:
    from vadsearch.config import TrainConfig
    from vadsearch.data import Corpus


def fit(config: TrainConfig, corpus: Corpus, **training: Any) -> RunResult:
    """`training` (run_dir, device, on_epoch, progress) goes to `train.train`; the baseline needs none."""
    if config.model == "baseline":
        return constant_baseline(config, corpus)
    from vadsearch.train import train

    return train(config, corpus, **training)
