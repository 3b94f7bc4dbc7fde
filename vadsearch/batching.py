"""Smart batching: sentences of similar length share a batch, padded only to their own longest one."""

from __future__ import annotations

import numpy as np
import torch

from vadsearch.encoding import EncodedSplit

PAD_MULTIPLE = 8  # few distinct shapes, and tensor-core friendly widths on GPUs
BUCKET_BATCHES = 50  # a bucket holds this many batches: sorted inside, so batches are length-homogeneous


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices per batch for one epoch: shuffled, bucketed by length, batch order shuffled.

    Sorting happens only inside random buckets, so every epoch sees different batch compositions and
    training stays stochastic while padding stays small.
    """
    order = rng.permutation(len(lengths))
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Deterministic batches sorted by length (predictions are put back in row order by the caller)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(split: EncodedSplit, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, lengths, targets) for `rows`, ids cut to the batch's longest sentence.

    `lengths` stays on the CPU: packing an LSTM batch needs it there, and a model that wants it on the
    device copies 4 bytes a row. On CUDA it is pinned, like the rest: a copy from pageable memory may wait
    for the stream, a host sync on every step.
    """
    lengths = split.lengths[rows]
    width = min(split.ids.shape[1], -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
    non_blocking = device.type == "cuda"
    ids = torch.from_numpy(split.ids[rows, :width])
    targets = torch.from_numpy(split.targets[rows])
    cpu_lengths = torch.from_numpy(lengths)
    if non_blocking:
        ids, targets, cpu_lengths = ids.pin_memory(), targets.pin_memory(), cpu_lengths.pin_memory()
    return (
        ids.to(device, non_blocking=non_blocking),
        cpu_lengths,
        targets.to(device, non_blocking=non_blocking),
    )
