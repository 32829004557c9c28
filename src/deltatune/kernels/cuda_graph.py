"""Replay a whole training step (forward, backward, optimizer) as one CUDA graph.

A LoRA step of a ~1B model at 8k tokens launches a few thousand kernels, and launching them from
Python can take as long as running them. Captured once, the step replays with no host work but a
copy of the next batch into the captured input buffers.

Requirements (checked where cheap, otherwise the caller's to meet): fixed batch shapes; no host
synchronisation inside the step (no ``.item()``, no data-dependent Python branching); no dropout
(its seed would be frozen into the graph); an optimizer built with ``capturable=True``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from ._scoped_flag import ScopedFlag

__all__ = ["GraphedTrainStep", "graph_pool_bytes", "graph_pool_segments", "peak_memory_bytes", "for_capture",
           "warming_up_for_capture"]

_WARMING_UP = ScopedFlag()


def warming_up_for_capture() -> AbstractContextManager[None]:
    """Inside: an eager run that prepares a capture (Triton's compilation, cuBLAS's workspace), so
    code that runs differently under capture (for_capture) takes the captured path already."""
    return _WARMING_UP.raised()


def for_capture() -> bool:
    """Whether the work queued now is being captured into a CUDA graph, or warms one up."""
    return bool(_WARMING_UP) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class GraphedTrainStep:
    """``step(batch) -> loss`` captured as a CUDA graph; call the object with each new batch.

    ``step`` must do forward, ``loss.backward()`` and ``optimizer.step()`` and must not zero the
    gradients: the captured backward writes them afresh on every replay.
    """

    def __init__(self, step: Callable[[dict[str, torch.Tensor]], torch.Tensor], example_batch: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, warmup_steps: int = 3) -> None:
        self.static_batch = {name: t.detach().clone() for name, t in example_batch.items()}
        # warm up on a side stream, as torch.cuda.graph requires: lazy init, autotuning, optimizer state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                step(self.static_batch)
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = step(self.static_batch)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in batch.items():
            self.static_batch[name].copy_(tensor, non_blocking=True)
        self.graph.replay()
        return self.static_loss


def _device_index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is None or torch.device(device).index is None:
        return torch.cuda.current_device()
    return torch.device(device).index


def graph_pool_segments(device: torch.device | int | None = None) -> dict[int, tuple[int, int]]:
    """The segments CUDA-graph memory pools hold on `device`: address -> (bytes, bytes allocated)."""
    index = _device_index(device)
    return {segment["address"]: (segment["total_size"], segment["allocated_size"])
            for segment in torch.cuda.memory_snapshot()
            if segment.get("device", index) == index and tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)}


def graph_pool_bytes(device: torch.device | int | None = None) -> int:
    """Bytes held by CUDA-graph memory pools that the allocator counts as free.

    A captured graph's temporaries are freed during capture and stay in the graph's private pool;
    every replay writes them again without asking the allocator, so
    ``torch.cuda.max_memory_allocated`` never sees them. A peak that leaves them out flatters any
    code that replays graphs (block graphs, GraphedTrainStep, the decode graphs).
    """
    return sum(size - allocated for size, allocated in graph_pool_segments(device).values())


def peak_memory_bytes(device: torch.device | int | None = None) -> int:
    """Peak device memory since the last ``torch.cuda.reset_peak_memory_stats``, graph temporaries included.

    The allocator's peak of allocated bytes plus what graph pools hold unallocated now (see
    :func:`graph_pool_bytes`): an upper bound when a pool grew after the peak, exact otherwise.
    """
    return torch.cuda.max_memory_allocated(device) + graph_pool_bytes(device)
