"""Greedy decoding over a static key/value cache, each one-token step replayed as a CUDA graph.

`generate()` runs every decode step through Python: for a 1B Llama at batch 32 on an H200 a step
costs the host ~10 ms while the GPU needs well under one (benchmarks/multi_adapter.py), and every
unmerged LoRA layer adds its own launches on top. Here the cache has fixed addresses
(transformers' StaticCache), the step's inputs live in fixed buffers that the step itself
advances (next token = argmax, position + 1, mask column set), so on CUDA the step is captured
once and replayed with no host work but one copy of the new tokens per step.

A mixed batch (`adapter_names=`) keeps its routing for the whole call: the layers' stacked
adapters and row slots are built at prefill and the captured step reads them in place.

Each row's tokens are those of the model's own forward over the whole sequence at each step (no
cache), which is `model.generate(..., do_sample=False)`'s too, except that the result always has
`max_new_tokens` new columns (after a row's end-of-sequence token: pad) and only greedy search is
offered. (On sliding-window layers past their window, transformers' generate() with its dynamic
cache can depart from the cache-free forward; the static cache here does not: tests.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import hf_compat
from .layer import index_tensor

__all__ = ["GenerationError", "greedy_generate", "left_pad", "supports_static_decode"]


class GenerationError(ValueError):
    """greedy_generate cannot run this model or these inputs; the message says why."""


@dataclass
class _StepBuffers:
    """Everything one decode step reads and advances, at fixed addresses."""

    ids: torch.Tensor  # (batch, 1): the token each row feeds next
    mask: torch.Tensor  # (batch, max length): 1 at real tokens so far, 0 at padding and the future
    positions: torch.Tensor  # (batch, 1): each row's next position id (padding not counted)
    cache_position: torch.Tensor  # (1,): the cache slot the next token is written to


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model a DeltaModel wraps (the model itself otherwise): what decoding calls."""
    from .model import DeltaModel

    return model.model if isinstance(model, DeltaModel) else model


def supports_static_decode(model: nn.Module) -> str | None:
    """None if greedy_generate can run `model`, else the reason it cannot."""
    from .model import DeltaModel

    inner = inner_model(model)
    if not hf_compat.supports_static_cache(inner):
        return f"{type(inner).__name__} does not support a static key/value cache"
    if isinstance(model, DeltaModel):
        extending = sorted({type(layer).__name__ for _, layer in model.delta_layers()
                            if layer.extends_sequence and layer.active_unmerged() and not layer.disabled})
        if extending:
            return f"soft-prompt layers ({', '.join(extending)}) add positions the static cache does not hold"
    return None


def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    adapter_names: Sequence[str | None] | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int = 0,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Greedy continuation of `input_ids` (batch, prompt), left-padded as `attention_mask` says.

    Returns (batch, prompt + max_new_tokens) token ids. adapter_names: one adapter per row, as in
    DeltaModel.forward. cuda_graph: replay the decode step as a CUDA graph (default: on CUDA).
    """
    reason = supports_static_decode(model)
    if reason is not None:
        raise GenerationError(f"greedy_generate cannot run this model: {reason}; use model.generate().")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be (batch, prompt length) with a prompt, got shape {tuple(input_ids.shape)}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise GenerationError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}.")
    use_graph = input_ids.is_cuda if cuda_graph is None else cuda_graph
    if use_graph and not input_ids.is_cuda:
        raise GenerationError("cuda_graph=True needs the model and input_ids on a CUDA device.")

    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    forward, routing = _forward_and_routing(model, adapter_names)
    with torch.inference_mode(), routing:
        new_tokens = _decode(forward, input_ids, attention_mask.to(torch.long), max_new_tokens, use_graph, eos)
    if eos is not None:
        new_tokens = _pad_after_eos(new_tokens, eos, pad_token_id)
    return torch.cat([input_ids, new_tokens], dim=1)


def left_pad(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned: a decoder-only model continues
    each prompt from the last column, so the padding must go on the left."""
    width = max(len(row) for row in rows)
    # Built as lists, one tensor each: a server's worker pays for every torch call it makes.
    input_ids = [[pad_id] * (width - len(row)) + list(row) for row in rows]
    attention_mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(input_ids, dtype=torch.long, device=device), torch.tensor(attention_mask, dtype=torch.long, device=device)


def _forward_and_routing(model: nn.Module, adapter_names: Sequence[str | None] | None) -> tuple[nn.Module, Any]:
    """The module to call for each step, and the context that routes rows for the whole call.

    A DeltaModel's rows are routed once (DeltaModel.mixed_batch) and the wrapped model is called
    directly, so no step builds routing tensors (which a CUDA graph capture would refuse)."""
    from .model import DeltaModel

    if not isinstance(model, DeltaModel):
        if adapter_names is not None:
            raise GenerationError("adapter_names needs a DeltaModel (deltatune.wrap or deltatune.load).")
        return model, contextlib.nullcontext()
    routing = model.mixed_batch(adapter_names) if adapter_names is not None else contextlib.nullcontext()
    return model.model, routing


# With an end-of-sequence token, whether every row has ended is read back every this many steps
# (each read waits for the device; between them the host queues steps ahead).
EOS_CHECK_EVERY = 8


def _decode(forward: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            use_graph: bool, eos: torch.Tensor | None) -> torch.Tensor:
    batch, prompt = input_ids.shape
    device = input_ids.device
    config = getattr(forward, "config", None)
    cache = hf_compat.new_static_cache(config, prompt + max_new_tokens)

    mask = torch.zeros((batch, prompt + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :prompt] = attention_mask
    # Left padding: a row's positions count its real tokens only, as generate() numbers them.
    prompt_positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    prefill_kwargs = hf_compat.static_decode_kwargs(forward, cache, torch.arange(prompt, device=device))
    logits = forward(input_ids=input_ids, attention_mask=mask, position_ids=prompt_positions, **prefill_kwargs).logits
    buffers = _StepBuffers(
        ids=logits[:, -1].argmax(-1, keepdim=True),
        mask=mask,
        positions=attention_mask.sum(-1, keepdim=True),
        cache_position=index_tensor([prompt], device),
    )
    tokens = torch.zeros((batch, max_new_tokens), dtype=input_ids.dtype, device=device)
    tokens[:, 0] = buffers.ids[:, 0]
    step = _step_function(forward, buffers, hf_compat.static_decode_kwargs(forward, cache, buffers.cache_position))
    run = replayed_as_cuda_graph(step) if use_graph and max_new_tokens > 2 else step
    for index in range(1, max_new_tokens):
        if eos is not None and index % EOS_CHECK_EVERY == 0 and bool(torch.isin(tokens[:, :index], eos).any(1).all()):
            break  # every row has ended: the rest is padding
        run()
        tokens[:, index] = buffers.ids[:, 0]
    return tokens


def _step_function(forward: nn.Module, buffers: _StepBuffers, kwargs: dict) -> Callable[[], None]:
    """One decode step that reads and advances `buffers` in place (so it can be captured)."""

    def step() -> None:
        buffers.mask.index_fill_(1, buffers.cache_position, 1)  # the token fed now is visible to itself
        logits = forward(input_ids=buffers.ids, attention_mask=buffers.mask, position_ids=buffers.positions, **kwargs).logits
        buffers.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        buffers.positions.add_(1)
        buffers.cache_position.add_(1)

    return step


def replayed_as_cuda_graph(step: Callable[[], None], pool: Any = None) -> Callable[[], None]:
    """`step` captured as a CUDA graph. The first call runs it eagerly on a side stream (lazy
    initialisation and library workspaces must happen outside the capture); that call is a real step.
    pool: a memory pool shared with other captures that never run at the same time
    (torch.cuda.graph_pool_handle()); default: the graph's own."""
    state: dict[str, Any] = {}

    def run() -> None:
        if "graph" in state:
            state["graph"].replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()  # recorded, not run: the next call's replay runs it
        state["graph"] = graph

    return run


def _pad_after_eos(tokens: torch.Tensor, eos: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Tokens after each row's first end-of-sequence token become `pad_token_id`, as in generate()
    (columns never run, after an early stop, are among them)."""
    is_eos = torch.isin(tokens, eos)
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    return tokens.masked_fill(after, pad_token_id)
