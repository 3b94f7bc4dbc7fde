"""Out of GPU memory: whose fault it is decides what happens next.

Several workers share a GPU (`launch --workers-per-gpu`). When one of them runs out of memory while the
other processes on the card hold more of it than this one does, the configuration is not at fault: the
card is oversubscribed. That worker stops, giving its memory to the others, and its trial is queued again
without spending a retry (a `MachineFault`). When this process holds most of the card, the configuration
does not fit on its own: an error of the configuration (`TrainingError`), retried and given up like one.

Each trial also records the most memory its worker held (`peak_mib`), which tells how many such workers a
card can take.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vadsearch.errors import GpuMemoryError, TrainingError

GIB = 1024**3


def blame(device: str, *, free: int, total: int, own: int) -> GpuMemoryError | TrainingError:
    """`own`: what this process's allocator holds; the rest of the used memory is other processes'
    (and this process's CUDA context, a few hundred MiB, which errs towards blaming the others)."""
    others = max(0, total - free - own)
    held = f"other processes hold {others / GIB:.1f} GiB of its {total / GIB:.1f} GiB, this one {own / GIB:.1f} GiB"
    if others > own:
        return GpuMemoryError(f"out of GPU memory on {device}: {held}; this worker stops so that the others can "
                              "go on, and its trial is queued again without spending a retry (too many workers "
                              "on this GPU: launch fewer with --workers-per-gpu)")
    return TrainingError(f"out of GPU memory on {device}: {held}; this configuration does not fit on it: lower "
                         "batch_size or max_length, or freeze more of the model")


def readings(device: torch.device) -> tuple[int, int, int] | None:
    """(free, total, own) bytes, or None off CUDA or when the driver cannot say."""
    if device.type != "cuda":
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
        return free, total, torch.cuda.memory_reserved(device)
    except RuntimeError:
        return None


@contextmanager
def blamed(device: torch.device) -> Iterator[None]:
    """Turns torch's OutOfMemoryError into `blame`'s verdict; other errors pass unchanged."""
    try:
        yield
    except torch.OutOfMemoryError:
        found = readings(device)  # read before anything is freed: what held the card when it ran out
        if found is None:
            raise
        free, total, own = found
        raise blame(str(device), free=free, total=total, own=own) from None


def reset_peak(device: torch.device) -> None:
    """Before a trial: the memory an earlier trial of this process left in the allocator's cache goes
    back to the card (for the other workers on it), and the peak counts this trial alone."""
    if device.type == "cuda":
        gc.collect()  # an earlier trial's model and optimizer, if a reference cycle still holds them
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """The most memory this process's allocator held on `device` since `reset_peak`: what a worker needs
    of a shared card (reserved, not allocated: the cache is held too). None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
