"""Letting a backward write its gradients over the activations it saved, where that is safe.

A checkpointed block's recomputation builds an autograd graph that is differentiated exactly once
and then dropped (kernels/block_graphs.py: `_block_gradients`). In that graph a node's saved
activations are dead once its backward has read them, so the gated activation's backward can
write d gate and d up over gate and up instead of allocating two more intermediate-size tensors:
the largest temporaries of an MLP's backward (unsloth's SwiGLU backward does the same).

Three conditions, each checked here, make the overwrite safe:
  * the graph is differentiated once (`differentiated_once()`, set around the recomputation's
    forward by the code that then calls autograd.grad once): no retain_graph second pass reads them;
  * the tensors are fresh outputs of deltatune's own kernels (`mark_fresh`), never a leaf, a
    parameter, a buffer or a view of the block's input;
  * no other node reads them later unnoticed: `overwritten()` bumps their version counters, so a
    node that saved the same memory and unpacks it afterwards raises autograd's in-place error
    instead of reading gradients.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from ._scoped_flag import ScopedFlag

__all__ = ["differentiated_once", "mark_fresh", "may_overwrite", "overwritten"]

_ONCE = ScopedFlag()  # per thread: the forward of a recomputation runs on the thread that asked for it
_FRESH = "_deltatune_fresh"


def differentiated_once() -> AbstractContextManager[None]:
    """Inside: the autograd graph being built will be differentiated once, then dropped."""
    return _ONCE.raised()


def mark_fresh(tensor: torch.Tensor) -> torch.Tensor:
    """Tag a kernel's output as memory nothing else owns (returns it)."""
    setattr(tensor, _FRESH, True)
    return tensor


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def may_overwrite(*tensors: torch.Tensor) -> bool:
    """Whether a node built now may later write over `tensors` (see the module's conditions).
    Call it in the node's forward, where the tensors are the objects its producers returned."""
    if not _ONCE:
        return False
    if not all(getattr(t, _FRESH, False) and t.is_contiguous() for t in tensors):
        return False
    spans = sorted(_span(t) for t in tensors)
    return all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def overwritten(*tensors: torch.Tensor) -> None:
    """Record that `tensors` were written in place (by a kernel autograd does not see)."""
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)
