"""One training step's forward and backward: run op by op, or replayed from a CUDA graph per batch shape.

A bert-base step on an H100 takes 26-37 ms against a few milliseconds of arithmetic: the host is busy
launching some 1,500 kernels one at a time. A CUDA graph launches them all as one. Smart batching keeps
the shapes few (widths are multiples of 8), so each (batch, width) shape is captured the first time it
comes and replayed after that.

A graph captures: zeroing the gradients, the forward under bf16 autocast, the loss, and the backward
into gradient buffers that persist from step to step. Clipping, the optimizer (fused: a few launches)
and the scheduler stay outside it, so the learning rate stays an ordinary number the scheduler sets.

Graphs are opt-in (`VADSEARCH_CUDA_GRAPHS=1`) until the benchmark shows what they win; a model whose
step cannot be captured (a host sync in its forward, say) trains without them, with one warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vadsearch.gpumemory import out_of_memory

log = logging.getLogger(__name__)

GRAPHS_ENV = "VADSEARCH_CUDA_GRAPHS"
FIRST_WARMUP_STEPS = 3  # lazy initialisation (cuBLAS handles, autograd threads) happens before any capture
LATER_WARMUP_STEPS = 1  # per further shape: kernels and workspaces for its sizes

# (ids, lengths, targets) -> the batch's mean loss, detached; the gradients are left in each p.grad.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(device: torch.device, cache: bool = True):
    # bf16 keeps fp32's exponent range, so regression targets need no loss scaling. A captured graph
    # must cast the weights inside itself, hence no cache there.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                          cache_enabled=cache)


def graphs_wanted() -> bool:
    return os.environ.get(GRAPHS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def loss_and_backward(model: nn.Module, ids, lengths, targets, device: torch.device, cache: bool = True):
    with autocast(device, cache):
        predictions = model(ids, lengths)
    loss = F.mse_loss(predictions.float(), targets)
    loss.backward()
    return loss.detach()


def eager_step(model: nn.Module, device: torch.device) -> Step:
    def step(ids, lengths, targets):
        model.zero_grad(set_to_none=True)
        return loss_and_backward(model, ids, lengths, targets, device)

    return step


class Capture(Protocol):
    """Turns a step body into a replay function: runs it to warm up, captures it, returns `replay`."""

    def __call__(self, body: Callable[[], torch.Tensor], warmup_steps: int) -> Callable[[], torch.Tensor]: ...


class CudaCapture:
    """The real thing: warm-up on a side stream, then one graph per body, all sharing one memory pool.

    Sharing is safe because a graph's replay writes every intermediate before reading it, and no other
    graph runs between a replay's forward and backward: they are one graph.
    """

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()  # one for every warm-up: memory cached for a stream stays with it

    def __call__(self, body, warmup_steps):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(warmup_steps):
                body()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (a checkpoint writer's, say) cannot break it.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss = body()

        def replay() -> torch.Tensor:
            graph.replay()
            return loss

        return replay


@dataclass
class _Shape:
    ids: torch.Tensor  # static inputs: each step's batch is copied in before the replay
    lengths: torch.Tensor
    targets: torch.Tensor
    replay: Callable[[], torch.Tensor] | None = None


class GraphedStep:
    """A `Step` that captures each batch shape once and replays it after; eager where capture fails."""

    def __init__(self, model: nn.Module, device: torch.device, capture: Capture | None = None) -> None:
        self.model, self.device = model, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads: list[torch.Tensor] = []  # the persistent buffers every graph writes
        self.shapes: dict[tuple[int, ...], _Shape] = {}
        self.capture = capture or CudaCapture()
        self.eager = eager_step(model, device)
        self.failed = False

    def __call__(self, ids, lengths, targets):
        if self.failed:
            return self.eager(ids, lengths, targets)
        shape = self.shapes.get(tuple(ids.shape))
        if shape is None:
            shape = self._capture(ids, lengths, targets)
            if shape is None:
                return self.eager(ids, lengths, targets)
        else:
            shape.ids.copy_(ids, non_blocking=True)
            shape.lengths.copy_(lengths, non_blocking=True)
            shape.targets.copy_(targets, non_blocking=True)
        return shape.replay()

    def _body(self, shape: _Shape) -> torch.Tensor:
        if self.grads:
            torch._foreach_zero_(self.grads)
        return loss_and_backward(self.model, shape.ids, shape.lengths, shape.targets, self.device, cache=False)

    def _capture(self, ids, lengths, targets) -> _Shape | None:
        shape = _Shape(ids.clone(), lengths.to(self.device, copy=True), targets.clone())
        # The warm-ups are extra forwards: under dropout they would draw random numbers an eager step does
        # not, and a resumed run, capturing in a later epoch, would then draw other masks from there on.
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                if not self.grads:
                    self._allocate_grads(shape)
                shape.replay = self.capture(lambda: self._body(shape),
                                            LATER_WARMUP_STEPS if self.shapes else FIRST_WARMUP_STEPS - 1)
        except RuntimeError as exc:
            if out_of_memory(exc):
                raise  # the card is full, not the capture impossible: `gpumemory.blamed` says whose fault
            self._give_up((str(exc).splitlines() or [type(exc).__name__])[0])
            return None
        self.shapes[tuple(ids.shape)] = shape
        return shape

    def _allocate_grads(self, shape: _Shape) -> None:
        """One eager warm-up with no gradients yet: the backward allocates exactly the ones it writes."""
        self.model.zero_grad(set_to_none=True)
        self._body(shape)
        missing = [p for p in self.params if p.grad is None]
        if missing:
            # A replay would hand the optimizer zeros where an eager step hands it no gradient at all.
            raise RuntimeError(f"{len(missing)} trainable tensors get no gradient from the forward")
        self.grads = [p.grad for p in self.params]

    def _give_up(self, reason: str) -> None:
        log.warning("training without CUDA graphs: this model's step cannot be captured (%s)", reason)
        self.failed, self.shapes, self.grads = True, {}, []
        self.model.zero_grad(set_to_none=True)


def make_step(model: nn.Module, device: torch.device) -> Step:
    """A graphed step where asked for and possible (CUDA, a model that says it can be captured), else eager."""
    if graphs_wanted() and device.type == "cuda" and getattr(model, "capturable", False):
        return GraphedStep(model, device)
    return eager_step(model, device)
