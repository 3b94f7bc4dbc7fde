"""Out of GPU memory: whose fault it is decides what happens next.

Several workers share a GPU (`launch --workers-per-gpu`). When one of them runs out of memory while the
other processes on the card hold more of it than this one does, the configuration is not at fault: the
card is oversubscribed. That worker stops, giving its memory to the others, and its trial is queued again
without spending a retry (a `MachineFault`). When this process holds most of the card, the configuration
does not fit on its own: an error of the configuration (`TrainingError`), retried and given up like one.
So is an allocation larger than the whole card; and the worker counts a configuration that runs out on a
shared card a second time as its own error too (`worker.Worker._gave_way_before`).

Each trial also records the most memory its worker held (`peak_mib`), which tells how many such workers a
card can take.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vadsearch.errors import GpuMemoryError, TrainingError
from vadsearch.launch import CONTEXT_MIB

GIB = 1024**3
CONTEXT_BYTES = CONTEXT_MIB * 2**20
# Memory failures that torch raises as a plain RuntimeError (AcceleratorError): a CUDA call, a cuBLAS or a
# cuDNN workspace that could not be allocated, the likes of which a new process meets on a full card.
_OTHER_OUT_OF_MEMORY = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED")
# The host's allocator: a configuration too large for this machine's memory, whatever the device.
_HOST_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")
# CUDA's "Tried to allocate 20.00 MiB", the host's "you tried to allocate 12800000000000 bytes".
_REQUESTED = re.compile(r"[Tt]ried to allocate (\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB|bytes)")
_UNITS = {"B": 1, "bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the GPU ran out of memory, whichever way torch raised it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_OTHER_OUT_OF_MEMORY.search(str(exc)))


def requested_bytes(message: str) -> int | None:
    """The allocation that failed, from torch's message; None if it does not say."""
    found = _REQUESTED.search(message)
    return int(float(found[1]) * _UNITS[found[2]]) if found else None


def blame(device: str, *, free: int, total: int, own: int,
          requested: int | None = None) -> GpuMemoryError | TrainingError:
    """`own`: what this process's allocator holds; the rest of the used memory is other processes'
    (and this process's CUDA context, a few hundred MiB, which errs towards blaming the others).
    `requested`: the allocation that failed, when known."""
    others = max(0, total - free - own)
    held = f"other processes hold {others / GIB:.1f} GiB of its {total / GIB:.1f} GiB, this one {own / GIB:.1f} GiB"
    if requested is not None:
        held += f", and it asked for {requested / GIB:.2f} GiB more"
    alone_too = requested is not None and own + requested > total - CONTEXT_BYTES  # not even on an empty card
    if others > own and not alone_too:
        return GpuMemoryError(f"out of GPU memory on {device}: {held}; too many processes share this GPU "
                              "(run fewer workers on it: --workers-per-gpu)")
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
    """Turns running out of GPU memory into `blame`'s verdict, and out of host memory into the
    configuration's error; other errors pass unchanged."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if _HOST_OUT_OF_MEMORY.search(str(exc)):
            asked = requested_bytes(str(exc))
            size = f" ({asked / GIB:,.1f} GiB at once)" if asked is not None else ""
            raise TrainingError(f"out of this machine's memory{size}; this configuration does not fit: lower "
                                "hidden_size, batch_size or max_length") from None
        if not out_of_memory(exc):
            raise
        found = readings(device)  # read before anything is freed: what held the card when it ran out
        if found is None:
            raise
        free, total, own = found
        raise blame(str(device), free=free, total=total, own=own, requested=requested_bytes(str(exc))) from None


def release(device: torch.device) -> None:
    """The memory a finished trial left in this process's allocator cache goes back to the card, for the
    other workers on it (an idle worker would otherwise hold it, and a busy one be blamed for it)."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        gc.collect()  # a model and optimizer that a reference cycle still holds
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Before a trial: what an earlier trial of this process left cached goes back to the card, and the
    peak counts this trial alone."""
    if device.type == "cuda" and torch.cuda.is_initialized():  # else nothing is held and nothing counted yet
        release(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """The most memory this process's allocator held on `device` since `reset_peak`: what a worker needs
    of a shared card (reserved, not allocated: the cache is held too). None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
