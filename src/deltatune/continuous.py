"""Continuous batching: requests join and leave a running greedy decode between its steps.

`greedy_generate` decodes a batch from start to end: a request that arrives meanwhile waits for
the whole batch, and a row that ends early keeps its seat. Here a fixed number of rows share one
static key/value cache and one write column `t`: each step feeds every row's last token and
writes its keys and values at column t. A request joins a free row between steps: its prompt is
prefilled on its own (joiners together, left-padded) and the keys and values are copied into its
row so that the prompt ends at column t. Columns before it hold a former row's entries, which the
row's attention mask hides, so the row computes what it would compute alone.

    columns   0 ........................ t-1 | t (written by the next step) ... context-1
    row 0     [stale ][prompt 0 ][tokens 0 ]  |
    row 1     [prompt 1         ][tokens 1 ]  |
    row 2     [stale      ][prompt 2       ]  |   (joined just now)

A joiner whose prompt is longer than t, or rows that would run past the cache's end, move the
window of live columns (one copy of the cache, only then). A request whose prompt and new tokens
together exceed the cache can never join: `fits` says so before `admit`.

Rows name their adapter as in DeltaModel's mixed batches, routed over every adapter the model can
route in one fixed order, so that rows coming and going only rewrite the rows' slot tensors in
place. Each step is one forward of the whole row set that reads and advances buffers at fixed
addresses; on CUDA it is captured once as a CUDA graph and replayed, captured again only when the
model's adapters change (loaded, deleted, replaced, restacked) or the rows' routing cannot be
rewritten in place (per-row modules_to_save copies split rows into groups on the host).

Joiners' prefills are captured too: an eager prefill of a few short prompts costs the host ten
decode steps (a forward's Python over every layer and adapter), which under a server's steady
arrivals outweighs decoding. On CUDA the joiners are padded to a power-of-two count of rows
(base rows with one token) and a power-of-two width (left padding the mask hides); each such
shape has its own cache and inputs at fixed addresses and is captured the second time it is met
under the same adapters, in one memory pool shared by all prefill shapes (they never run at once).
The shapes' caches together hold at most as many columns as the decode cache: the least recently
used shape is dropped first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import hf_compat
from .generation import GenerationError, inner_model, replayed_as_cuda_graph, supports_static_decode
from .layer import BASE_ROW, RowAdapters, index_tensor

__all__ = ["ContinuousDecoder", "DecodeRequest", "supports_continuous_decode"]

PREFILL_MIN_WIDTH = 8  # the narrowest padded prefill: prompts shorter than this share one shape


@dataclass(eq=False)
class DecodeRequest:
    """One request: its adapter (None: the base model), prompt token ids and token budget.
    `tag` is the caller's, returned untouched with the tokens."""

    adapter: str | None
    prompt_ids: Sequence[int]
    max_new_tokens: int
    tag: Any = None


@dataclass(eq=False)
class _Row:
    request: DecodeRequest
    start: int  # the cache column of the prompt's first token
    tokens: list[int] = field(default_factory=list)  # generated so far; the last is fed next

    @property
    def steps_left(self) -> int:
        """Decode steps this row still needs (each writes one column)."""
        return self.request.max_new_tokens - len(self.tokens)


def supports_continuous_decode(model: nn.Module) -> str | None:
    """None if ContinuousDecoder can run `model`, else the reason it cannot."""
    reason = supports_static_decode(model)
    if reason is not None:
        return reason
    inner = inner_model(model)
    if hf_compat.static_cache_has_sliding_layers(hf_compat.new_static_cache(inner.config, 1)):
        return "its sliding-window cache layers keep a ring buffer, whose columns cannot be moved between rows"
    return None


class ContinuousDecoder:
    """Greedy decoding of up to `rows` requests at once over a cache of `context` columns,
    with requests admitted between steps (`admit`) and returned as they end (`step`).

    A request ends at `max_new_tokens` tokens or at one of `eos_ids` (included, as
    model.generate returns it). Not thread-safe: one thread owns a decoder.
    """

    def __init__(self, model: nn.Module, rows: int, context: int, *, eos_ids: Iterable[int] = (),
                 cuda_graph: bool | None = None) -> None:
        """cuda_graph: replay each step as a CUDA graph (default: on CUDA)."""
        reason = supports_continuous_decode(model)
        if reason is not None:
            raise GenerationError(f"Continuous batching cannot run this model: {reason}.")
        if rows < 1 or context < 2:
            raise GenerationError(f"rows must be at least 1 and context at least 2, got rows={rows}, context={context}.")
        self.model = model
        self.forward = inner_model(model)
        self.rows = rows
        self.context = context
        self.eos_ids = set(eos_ids)
        self.device = next(self.forward.parameters()).device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise GenerationError(f"cuda_graph=True needs the model on a CUDA device, not {self.device}.")
        self._routable: tuple[tuple, set[str]] | None = None  # the model's adapters, those that route rows
        self.captures = 0  # how many times a decode step was captured as a CUDA graph
        self.prefill_captures = 0  # and how many times a prefill shape was
        # The device's time in steps and in prefills (CUDA only): set beside the host's time around
        # step() and admit(), it tells a device-bound decoder from a host-bound one.
        self.step_device_seconds = 0.0
        self.prefill_device_seconds = 0.0
        # Prefills padded to power-of-two shapes (rows, width), as graphs need; an eager decoder
        # pads only if asked (a test compares graphs and eager steps at equal shapes).
        self.padded_prefill = self.cuda_graph
        # The padded shapes' buffers, least recently used first, holding together at most as many
        # cache columns as the decode cache (rows x context): varied prompt lengths meet many shapes.
        self._prefills: dict[tuple[int, int], _PaddedPrefill] = {}
        self._shapes_met: set[tuple[int, int]] = set()
        self._prefill_pool: Any = None  # the memory pool prefill captures share (_shared_prefill_pool)
        self.reset()

    # -- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop every row (after a failed step the cache may be half written)."""
        # The steps' routing (rewritten in place as rows change) and the model's adapters it was made for.
        self._step_rows: tuple[tuple | None, RowAdapters] | None = None
        self._graph: _CapturedStep | None = None
        for prefill in self._prefills.values():  # their caches hold nothing between admissions: keep them
            prefill.routing, prefill.graph = None, None
        self._slots: list[_Row | None] = [None] * self.rows
        self._cache = hf_compat.new_static_cache(self.forward.config, self.context)
        self._allocated = False
        self.t = 0  # the column the next step writes
        self._layers_at_t = True  # whether the cache's layers would write at t (a step advances both)
        self._ids = torch.zeros((self.rows, 1), dtype=torch.long, device=self.device)
        self._positions = torch.zeros((self.rows, 1), dtype=torch.long, device=self.device)
        self._mask = torch.zeros((self.rows, self.context), dtype=torch.long, device=self.device)
        self._cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        # What every step passes beside ids, mask and positions: the cache and its write column.
        self._step_kwargs = hf_compat.static_decode_kwargs(self.forward, self._cache, self._cache_position)

    @property
    def active(self) -> list[DecodeRequest]:
        """The requests decoding now, in row order."""
        return [row.request for row in self._slots if row is not None]

    @property
    def free_rows(self) -> int:
        return self._slots.count(None)

    @property
    def prefill_shapes(self) -> list[tuple[int, int]]:
        """The padded (rows, width) shapes joiners were prefilled at so far."""
        return sorted(self._shapes_met)

    @property
    def prefill_cache_tokens(self) -> int:
        """Rows x columns of the prefill caches kept now (bounded by rows x context)."""
        return sum(rows * width for rows, width in self._prefills)

    # -- admission --------------------------------------------------------------------------
    def fits(self, requests: Sequence[DecodeRequest]) -> bool:
        """Whether `requests` can join together now: free rows, and columns for every prompt
        before t and every row's remaining tokens after it (moving the window if need be)."""
        if len(requests) > self.free_rows:
            return False
        return self._column_after_admitting(requests) is not None

    def could_ever_fit(self, request: DecodeRequest) -> bool:
        """Whether `request` fits an empty decoder (its prompt and new tokens within the cache)."""
        return len(request.prompt_ids) + request.max_new_tokens - 1 <= self.context

    def _column_after_admitting(self, requests: Sequence[DecodeRequest]) -> int | None:
        """The write column t' that admitting `requests` needs (t itself when no move is needed),
        or None if no column serves every row."""
        live = [row for row in self._slots if row is not None]
        longest_prompt = max((len(r.prompt_ids) for r in requests), default=0)
        steps = max([row.steps_left for row in live] + [r.max_new_tokens - 1 for r in requests], default=0)
        used = self.t - min((row.start for row in live), default=self.t)  # live columns, all before t
        lowest = max(used, longest_prompt)  # t' must leave room before it for these
        if self.t >= lowest and self.t + steps <= self.context:
            return self.t
        return lowest if lowest + steps <= self.context else None

    def admit(self, requests: Sequence[DecodeRequest]) -> list[tuple[DecodeRequest, list[int]]]:
        """Prefill `requests` and give each a free row; returns those already finished (a budget
        of one token, or an end-of-sequence token first) with their tokens."""
        if not requests:
            return []
        for request in requests:
            _check_request(request)
        column = self._column_after_admitting(requests) if len(requests) <= self.free_rows else None
        if column is None:
            raise GenerationError(f"{len(requests)} requests do not fit the decoder now; ask fits() first.")
        first_tokens, prefill_cache, width = self._prefill(requests)
        if column != self.t:
            self._move_window(column)
        finished: list[tuple[DecodeRequest, list[int]]] = []
        placements = []
        for index, (request, token) in enumerate(zip(requests, first_tokens)):
            if request.max_new_tokens == 1 or token in self.eos_ids:
                finished.append((request, [token]))
                continue
            slot = self._slots.index(None)
            self._slots[slot] = _Row(request, start=self.t - len(request.prompt_ids), tokens=[token])
            placements.append((slot, index, len(request.prompt_ids)))
        if placements:
            self._place(placements, prefill_cache, width, first_tokens)
        return finished

    def _prefill(self, requests: Sequence[DecodeRequest]) -> tuple[list[int], Any, int]:
        """Run the joiners' prompts (left-padded together) over a cache of their own; returns each
        one's first token, that cache (every prompt ending at its last column) and the longest prompt."""
        prompts = [list(r.prompt_ids) for r in requests]
        adapters = tuple(r.adapter for r in requests)
        width = max(len(prompt) for prompt in prompts)
        if self.padded_prefill:  # kept buffers of the padded shape, replayed as a CUDA graph once captured
            shape = (_padded_size(len(prompts), self.rows), _padded_size(width, self.context, PREFILL_MIN_WIDTH))
            prefill = self._padded_prefill_buffers(shape)
        else:  # buffers of this admission only, exactly the joiners and the longest prompt
            shape = (len(prompts), width)
            prefill = _PaddedPrefill.allocate(self.forward, *shape, self.device)
        padding = shape[0] - len(prompts)  # base rows of one token, whose results nobody reads
        with torch.inference_mode():
            prefill.inputs.copy_(_left_padded_inputs(prompts + [[0]] * padding, shape[1]))  # one copy to the device
            prefill.routing, rows = self._kept_routing(prefill.routing, adapters + (None,) * padding)
            with _DeviceTimer(self.device) as timer:
                graph = self._run(prefill.graph, lambda: self._prefill_in_place(prefill), rows, self._shared_prefill_pool())
            self.prefill_captures += _captured_anew(prefill.graph, graph)
            prefill.graph = graph
        first_tokens = prefill.first_tokens[: len(prompts)].tolist()  # waits for the prefill
        self.prefill_device_seconds += timer.seconds()
        return first_tokens, prefill.cache, width

    def _padded_prefill_buffers(self, shape: tuple[int, int]) -> "_PaddedPrefill":
        """The buffers of `shape`, made most recently used; a new shape first drops the least
        recently used ones (their caches and graphs) beyond the budget of rows x context."""
        self._shapes_met.add(shape)
        prefill = self._prefills.pop(shape, None)
        if prefill is None:
            while self._prefills and self.prefill_cache_tokens + shape[0] * shape[1] > self.rows * self.context:
                del self._prefills[next(iter(self._prefills))]
            prefill = _PaddedPrefill.allocate(self.forward, *shape, self.device)
        self._prefills[shape] = prefill
        return prefill

    def _shared_prefill_pool(self) -> Any:
        """The memory pool of prefill captures (they never run at once). CUDA releases a pool with
        the last graph captured into it, so once no captured prefill lives a fresh pool is taken."""
        if self.cuda_graph and self.device.type == "cuda" and not any(p.graph is not None and p.graph.run is not None for p in self._prefills.values()):
            self._prefill_pool = torch.cuda.graph_pool_handle()
        return self._prefill_pool

    def _prefill_in_place(self, prefill: "_PaddedPrefill") -> None:
        """One padded prefill: reads and writes only `prefill`'s buffers, so it can be captured."""
        hf_compat.set_static_cache_length(prefill.cache, 0)  # every run writes columns [0, width) afresh
        input_ids, mask, positions = prefill.inputs
        logits = self.forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, **prefill.kwargs).logits
        prefill.first_tokens.copy_(logits[:, -1].argmax(-1))

    def _place(self, placements: list[tuple[int, int, int]], prefill_cache: Any, width: int, first_tokens: list[int]) -> None:
        """Copy the joiners' keys and values into their rows, each prompt ending at column t.

        The prefill is left-padded, so every joiner's prompt ends at the cache's last column: one
        copy per layer moves all joiners' last `width` columns (the longest prompt's) to
        [t - width, t). The padding columns before a shorter prompt land on columns its row's mask
        hides (t >= width: admission leaves room before t for the longest prompt)."""
        if not self._allocated:
            hf_compat.allocate_static_cache(self._cache, self.rows, like=prefill_cache)
            self._allocated = True
            self._layers_at_t = False
        # One copy to the device: each placement's row, prefill row and prompt length.
        slots, joiners, lengths = index_tensor([index for placement in placements for index in placement], self.device).view(-1, 3).T
        # Usually every joiner is placed (none ended at its first token): its rows are then a slice.
        in_order = [index for _, index, _ in placements] == list(range(len(placements)))

        def placed(new: torch.Tensor) -> torch.Tensor:
            new = new[:, :, -width:]
            return new[: len(placements)] if in_order else new.index_select(0, joiners)

        with torch.inference_mode():
            for (keys, values), (new_keys, new_values) in zip(hf_compat.cache_key_values(self._cache),
                                                              hf_compat.cache_key_values(prefill_cache)):
                keys[:, :, self.t - width:self.t].index_copy_(0, slots, placed(new_keys))
                values[:, :, self.t - width:self.t].index_copy_(0, slots, placed(new_values))
            columns = torch.arange(self.context, device=self.device)
            visible = (columns >= self.t - lengths[:, None]) & (columns < self.t)  # each joiner's prompt
            self._mask.index_copy_(0, slots, visible.to(self._mask.dtype))
            tokens = index_tensor(first_tokens, self.device).index_select(0, joiners)
            self._ids.index_copy_(0, slots, tokens[:, None])
            self._positions.index_copy_(0, slots, lengths[:, None])

    def _move_window(self, column: int) -> None:
        """Shift every live column by column - t, so that the next step writes at `column`."""
        shift = column - self.t
        live = [row for row in self._slots if row is not None]
        if live and self._allocated:
            low = min(row.start for row in live)
            with torch.inference_mode():
                for keys, values in hf_compat.cache_key_values(self._cache):
                    keys[:, :, low + shift:self.t + shift] = keys[:, :, low:self.t].clone()
                    values[:, :, low + shift:self.t + shift] = values[:, :, low:self.t].clone()
                moved = self._mask[:, low:self.t].clone()
                self._mask.zero_()
                self._mask[:, low + shift:self.t + shift] = moved
            for row in live:
                row.start += shift
        self.t = column
        self._layers_at_t = False

    # -- decoding ---------------------------------------------------------------------------
    def step(self) -> list[tuple[DecodeRequest, list[int]]]:
        """One token for every row; returns the requests that ended with it, with their tokens."""
        if not any(self._slots):
            return []
        if self.t >= self.context:  # admission keeps every row within the cache
            raise GenerationError(f"the decoder ran past its {self.context} columns")
        self._cache_position.fill_(self.t)
        if not self._layers_at_t:  # after a move of the window or the first placement: tell them
            hf_compat.set_static_cache_length(self._cache, self.t)
            self._layers_at_t = True
        self._step_rows, rows = self._kept_routing(
            self._step_rows, tuple(row.request.adapter if row is not None else None for row in self._slots))
        with torch.inference_mode():
            with _DeviceTimer(self.device) as timer:
                graph = self._run(self._graph, self._step_in_place, rows)
            self.captures += _captured_anew(self._graph, graph)
            self._graph = graph
        self.t += 1
        new_tokens = self._ids[:, 0].tolist()  # waits for the step
        self.step_device_seconds += timer.seconds()
        return self._collect(new_tokens)

    def _step_in_place(self) -> None:
        """The step itself: reads and advances buffers at fixed addresses, so it can be captured."""
        self._mask.index_fill_(1, self._cache_position, 1)  # the token fed now is visible to itself
        logits = self.forward(input_ids=self._ids, attention_mask=self._mask, position_ids=self._positions, **self._step_kwargs).logits
        self._ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self._positions.add_(1)

    def _run(self, graph: "_CapturedStep | None", step: Any, rows: RowAdapters | None,
             pool: Any = None) -> "_CapturedStep | None":
        """Run `step` under `rows` and return what to keep for the next run.

        On CUDA graphs `graph` is replayed if it was captured over the same routing and stacks.
        Otherwise the step runs eagerly the first time it meets a routing and stacks, and is
        captured the second time in a row: a capture costs two eager runs, and a server loading
        adapters one by one changes them at every admission until all are resident."""
        if not self.cuda_graph or (rows is not None and not rows.assignable):
            with self._route(rows):
                step()
            return None
        seen = graph is not None and graph.rows is rows and _same_objects(graph.stacks, self._stacks_in_use())
        if seen and graph.run is not None:
            graph.run()
            return graph
        with self._route(rows):
            if not seen:
                step()  # may restack: the stacks to compare next time are those after it
                return _CapturedStep(None, rows, self._stacks_in_use())
            run = replayed_as_cuda_graph(step, pool=pool)
            run()  # the first call runs the step eagerly, then captures it
        return _CapturedStep(run, rows, self._stacks_in_use())

    def _stacks_in_use(self) -> tuple:
        from .model import DeltaModel

        return self.model.mixed_batch_stacks() if isinstance(self.model, DeltaModel) else ()

    def _collect(self, new_tokens: list[int]) -> list[tuple[DecodeRequest, list[int]]]:
        finished = []
        for slot, row in enumerate(self._slots):
            if row is None:
                continue
            row.tokens.append(new_tokens[slot])
            if row.steps_left == 0 or new_tokens[slot] in self.eos_ids:
                finished.append((row.request, row.tokens))
                self._free(slot)
        return finished

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        with torch.inference_mode():
            self._mask[slot].zero_()  # a free row attends to its own column only
            self._positions[slot, 0] = 0  # positions of free rows stay within the model's range
            self._ids[slot, 0] = 0

    # -- adapter routing --------------------------------------------------------------------
    def _route(self, rows: RowAdapters | None) -> Any:
        """The context that routes a forward's rows (nothing to route for a plain model)."""
        return contextlib.nullcontext() if rows is None else self.model.mixed_batch(rows)

    def _kept_routing(self, kept: tuple[tuple | None, RowAdapters] | None, adapters: tuple[str | None, ...]
                      ) -> tuple[tuple[tuple | None, RowAdapters] | None, RowAdapters | None]:
        """The routing of rows naming `adapters`: `kept` (a routing and the model's adapters it was
        made for) with its slots rewritten in place while the adapters the model can route stay the
        same (a captured step reads them there), else a new one. Returns (what to keep, the routing)."""
        rows = self._row_adapters(adapters)
        if rows is None:
            return None, None
        held = self._routable[0] if self._routable is not None else None
        if kept is not None:
            kept_held, kept_rows = kept
            # A new routing when the model's adapters changed: layers check their stacks only for new rows.
            if kept_held == held and kept_rows.names == rows.names and kept_rows.assignable:
                if kept_rows.slots != rows.slots:
                    kept_rows.assign(rows.slots)
                return kept, kept_rows
        return (held, rows), rows

    def _row_adapters(self, adapters: tuple[str | None, ...]) -> RowAdapters | None:
        """Rows routed over every adapter the model can route, in one fixed order, rather than
        over the rows' own: the layers' stacked adapters then stay valid while rows come and go
        (rebuilt only when the model's adapters change). None for a plain model."""
        from .model import DeltaModel

        if not isinstance(self.model, DeltaModel):
            if any(a is not None for a in adapters):
                raise GenerationError("Requests name adapters, which needs a DeltaModel (deltatune.wrap or deltatune.load).")
            return None
        named = {a for a in adapters if a is not None and a != BASE_ROW}
        names = tuple(sorted(self._routable_adapters() | named))
        return RowAdapters(names, tuple(len(names) if a is None or a == BASE_ROW else names.index(a) for a in adapters))

    def routes_rows(self, adapter: str | None) -> bool:
        """Whether a request for `adapter` can decode here (None, the base, always can): its
        method routes batch rows. Others are run one adapter at a time by the caller."""
        from .model import DeltaModel

        return adapter is None or adapter == BASE_ROW or not isinstance(self.model, DeltaModel) or adapter in self._routable_adapters()

    def _routable_adapters(self) -> set[str]:
        """The model's adapters whose method routes batch rows, found again when they change
        (keyed by the config objects too: an adapter reloaded under its name may be another method)."""
        held = tuple((n, id(self.model.configs[n])) for n in self.model.adapter_names)
        if self._routable is None or self._routable[0] != held:
            self._routable = (held, {n for n, _ in held if self.model.mixed_batch_refusal([n]) is None})
        return self._routable[1]


def _padded_size(size: int, ceiling: int, floor: int = 1) -> int:
    """The size a captured prefill runs at: the next power of two, at least `floor`, at most `ceiling`."""
    return min(ceiling, max(floor, 1 << (size - 1).bit_length()))


def _left_padded_inputs(prompts: list[list[int]], width: int) -> torch.Tensor:
    """(3, rows, width) on the host: token ids, attention mask and positions, each prompt ending at
    the last column (padding: id 0, hidden, position 0)."""
    rows = []
    for prompt in prompts:
        padding = [0] * (width - len(prompt))
        rows.append((padding + prompt, padding + [1] * len(prompt), padding + list(range(len(prompt)))))
    return torch.tensor(rows, dtype=torch.long).transpose(0, 1)


@dataclass(eq=False)
class _PaddedPrefill:
    """The joiners' prefill at one shape (padded, or exactly theirs), at fixed addresses: inputs
    written before each run, the cache and each row's first token read after it."""

    inputs: torch.Tensor  # (3, rows, width): token ids, attention mask (left padding hidden), positions
    cache: Any  # a static cache of `width` columns
    kwargs: dict  # the cache and what else each forward passes
    first_tokens: torch.Tensor  # (rows,)
    routing: tuple | None = None  # (the model's adapters it was made for, RowAdapters), as the steps'
    graph: "_CapturedStep | None" = None

    @classmethod
    def allocate(cls, forward: nn.Module, rows: int, width: int, device: torch.device) -> "_PaddedPrefill":
        cache = hf_compat.new_static_cache(forward.config, width)
        kwargs = hf_compat.static_decode_kwargs(forward, cache, torch.arange(width, device=device))
        inputs = torch.zeros((3, rows, width), dtype=torch.long, device=device)
        return cls(inputs, cache, kwargs, torch.zeros(rows, dtype=torch.long, device=device))


class _DeviceTimer:
    """The device's time in the work queued inside `with _DeviceTimer(device) as timer:`, read by
    timer.seconds() once that work has run (CUDA events; 0.0 elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else None

    def __enter__(self) -> "_DeviceTimer":
        if self._events is not None:
            self._events[0].record()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._events is not None:
            self._events[1].record()

    def seconds(self) -> float:
        return self._events[0].elapsed_time(self._events[1]) / 1000 if self._events is not None else 0.0


def _same_objects(these: tuple, those: tuple) -> bool:
    return len(these) == len(those) and all(a is b for a, b in zip(these, those))


@dataclass(eq=False)
class _CapturedStep:
    """A step captured as a CUDA graph (run: its replay; None while it has run eagerly once), and
    what it was captured over: the rows' routing (whose slot tensors it reads in place) and the
    layers' stacked adapters (kept alive here)."""

    run: Any
    rows: RowAdapters | None
    stacks: tuple


def _captured_anew(before: _CapturedStep | None, after: _CapturedStep | None) -> bool:
    return after is not None and after.run is not None and after is not before


def _check_request(request: DecodeRequest) -> None:
    if not request.prompt_ids:
        raise GenerationError("A request needs at least one prompt token.")
    budget = request.max_new_tokens
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {budget!r}.")
