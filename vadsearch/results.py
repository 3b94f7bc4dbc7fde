"""What a run returns, and the one run that trains nothing (the constant baseline).

Kept apart from train.py so that `fit` can score a baseline without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from vadsearch.config import TrainConfig
from vadsearch.metrics import Scores, score, train_means

if TYPE_CHECKING:
    from vadsearch.data import Corpus


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    dev: Scores
    seconds: float
    best: bool  # a new best dev score at this epoch
    restored: bool = False  # read back from a checkpoint rather than trained by this call

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "dev": self.dev.as_dict(),
                "seconds": self.seconds, "best": self.best}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochResult:
        return cls(d["epoch"], d["train_loss"], Scores.from_dict(d["dev"]), d["seconds"], d["best"])


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig
    best_epoch: int  # 0 for the untrained baseline
    dev: Scores
    test: Scores | None  # None when the corpus has no test split
    history: tuple[EpochResult, ...] = ()
    resumed_from: int = 0  # epochs found finished in the checkpoint when this call started
    stopped_early: bool = False
    trainable_params: int = 0
    total_params: int = 0
    trainable_names: tuple[str, ...] = field(default=(), repr=False)
    seconds: float = 0.0  # this call's wall time, plus the seconds of the epochs restored from a checkpoint
    peak_gpu_mib: float | None = None  # the most GPU memory this process held while training; None off CUDA

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.relevant(),
            "best_epoch": self.best_epoch,
            "dev": self.dev.as_dict(),
            "test": self.test.as_dict() if self.test else None,
            "history": [h.as_dict() for h in self.history],
            "resumed_from": self.resumed_from,
            "stopped_early": self.stopped_early,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "seconds": self.seconds,
            "peak_gpu_mib": self.peak_gpu_mib,
        }


EpochCallback = Callable[[EpochResult], None]


def constant_baseline(config: TrainConfig, corpus: Corpus) -> RunResult:
    """The untrained baseline: the training means (or the scale's midpoint 3) for every sentence."""
    value = train_means(corpus) if config.baseline == "mean" else np.full(3, 3.0)

    def evaluate(split):
        return score(np.broadcast_to(value, split.targets.shape), split.targets) if len(split) else None

    return RunResult(config, best_epoch=0, dev=evaluate(corpus.dev), test=evaluate(corpus.test))
