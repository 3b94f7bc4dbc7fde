"""Seeds and RNG state for Python, NumPy and torch, in a form `torch.load(weights_only=True)` accepts."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator a run draws from; on CUDA, the generator of the one GPU it trains on."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Put back what `capture_rng` saved. A run resumed on another GPU (another worker's `cuda:N`) draws on
    from the generator its own GPU had, wherever that GPU sat in the other process's numbering."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and state.get("cuda_device") is not None:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # a checkpoint from before the one-GPU state, by position
