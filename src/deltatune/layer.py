"""The base class of every injected layer, and the wrapper for modules trained in full.

A DeltaLayer wraps one module of the user's model (`base_layer`) and holds any number of named
adapters of one method in containers keyed by adapter name (e.g. `lora_A["default"]`), the layout
Hugging Face peft uses, so tensor names in saved files match peft's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
from torch import nn

BASE_ROW = "__base__"  # in adapter_names: this row runs on the base model alone


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a batch uses, for one mixed-batch forward (or generate) call.

    names: the distinct adapters, in first-seen order; slot i of a layer's stacked tensors is
    names[i], and slot len(names) is "no adapter" (identity / zero delta), which base rows use.
    rows: per row, its slot. Layers turn this into gathers and batched matmuls: work grows with the
    number of distinct adapters at most, never with a Python loop over rows.
    """

    names: tuple[str, ...]
    slots: tuple[int, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, row_names: Sequence[str | None]) -> "RowAdapters":
        names: list[str] = []
        for name in row_names:
            if name is not None and name != BASE_ROW and name not in names:
                names.append(name)
        slots = tuple(len(names) if n is None or n == BASE_ROW else names.index(n) for n in row_names)
        return cls(tuple(names), slots)

    @property
    def base_slot(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.slots)

    def slot_index(self, device: torch.device) -> torch.Tensor:
        """The rows' slots as a LongTensor on `device` (made once per device)."""
        key = ("slots", str(device))
        if key not in self._cache:
            self._cache[key] = index_tensor(self.slots, device)
        return self._cache[key]

    def derive(self, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor computed from the slots by `make` (from slot_index, with tensor ops only), made
        once per key and shared by every layer that asks; `assign` rewrites it in place."""
        derived = self._cache.setdefault("derived", {})
        if key not in derived:
            derived[key] = (make(), make)
        return derived[key][0]

    @property
    def assignable(self) -> bool:
        """Whether `assign` can give the rows new slots: nothing was derived from them but tensors
        (a layer that split rows into Python-side groups needs a new RowAdapters instead)."""
        return not any(key[0] == "groups" for key in self._cache if isinstance(key, tuple))

    def assign(self, slots: Sequence[int]) -> None:
        """Give the rows new slots in place: every tensor derived from them is rewritten where it
        lies, so layers (and a CUDA graph captured over them) read the new routing. For a decoder
        whose rows change between steps over the same adapters."""
        if len(slots) != len(self.slots) or any(not 0 <= s <= self.base_slot for s in slots):
            raise ValueError(f"assign needs {len(self.slots)} slots in 0..{self.base_slot}, got {list(slots)}.")
        if not self.assignable:
            raise ValueError("These rows were split into groups by a layer (modules_to_save); route them anew instead.")
        object.__setattr__(self, "slots", tuple(slots))
        with torch.inference_mode():
            for key, value in self._cache.items():
                if isinstance(key, tuple) and key[0] == "slots":
                    value.copy_(index_tensor(self.slots, value.device))
            for tensor, make in self._cache.get("derived", {}).values():
                tensor.copy_(make())

    def groups(self, device: torch.device) -> list[tuple[str | None, torch.Tensor]]:
        """(adapter name or None for base rows, row indices) per slot that has rows."""
        key = ("groups", str(device))
        if key not in self._cache:
            found = []
            for slot, name in enumerate([*self.names, None]):
                rows = [i for i, s in enumerate(self.slots) if s == slot]
                if rows:
                    found.append((name, index_tensor(rows, device)))
            self._cache[key] = found
        return self._cache[key]

    def check_batch(self, x: torch.Tensor, layer: str | Callable[[], str]) -> None:
        """Refuse a batch whose row count is not the routing's; `layer` names the layer (a callable
        is only called to build the error: layers run this on every forward)."""
        if x.shape[0] != len(self.slots):
            layer = layer if isinstance(layer, str) else layer()
            raise ValueError(
                f"adapter_names has {len(self.slots)} entries but {layer} got a batch of {x.shape[0]} rows; "
                f"give one adapter name (or None) per row of the input."
            )


def index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A LongTensor of `values` on `device`, copied without waiting for the device.

    torch.tensor(..., device="cuda") copies from pageable memory, which blocks the host until
    every queued kernel has run: once per mixed-batch forward, that drains the queue the host had
    built ahead and leaves the GPU idle while the next layers are launched. A pinned source copies
    asynchronously in stream order."""
    source = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return source.to(device)
    return source.pin_memory().to(device, non_blocking=True)


def autocast_enabled() -> bool:
    """Whether autocast is on for any device (torch.is_autocast_enabled() alone asks about CUDA only)."""
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


def adapter_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype for trainable adapter tensors beside a base tensor: float32 when the base is
    half precision or not floating point, because small updates vanish in 16-bit weights."""
    if reference.dtype in (torch.float16, torch.bfloat16) or not reference.is_floating_point():
        return torch.float32
    return reference.dtype


def packed_parameter_count(model: nn.Module) -> int:
    """Base weights a module keeps packed in buffers (a 4-bit layer's codes) rather than as
    parameters: model.parameters() misses them, but they are parameters of the base model.
    Such a module says so with a ``packed_parameter_count`` attribute."""
    return sum(int(getattr(module, "packed_parameter_count", 0)) for module in model.modules())


class DeltaLayer(nn.Module):
    """Common bookkeeping: active/merged adapters, deletion, saving of per-adapter tensors.

    Subclasses set `adapter_attributes` (the names of their per-adapter containers) and
    implement `add_adapter` and `forward`; mergeable ones implement `delta_weight` (additive
    deltas) or override `merge_adapter`/`unmerge_adapter`.
    """

    adapter_attributes: tuple[str, ...] = ()
    # Layers that read `row_adapters` in forward (one adapter per batch row) say so here.
    supports_mixed_batch: bool = False
    # Layers that add positions or key/value entries of their own (soft prompts) say so here: a
    # decode loop that keeps its own positions over a static cache cannot run them.
    extends_sequence: bool = False
    # Siblings called on the same input (mixed_batch.InputGroup), set by DeltaModel; None: none.
    input_group: Any = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowAdapters | None = None  # set by DeltaModel for a mixed-batch call

    # -- introspection --------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        """The original module under any stack of wrappers (hybrids nest DeltaLayers)."""
        layer = self.base_layer
        while isinstance(layer, DeltaLayer):
            layer = layer.base_layer
        return layer

    def inner_prefix(self) -> str:
        """The `base_layer.` hops from this layer's base_layer to the original module, so that
        torch.func.functional_call can address its tensors under nested wrappers (hybrids)."""
        prefix, layer = "", self.base_layer
        while isinstance(layer, DeltaLayer):
            prefix, layer = prefix + "base_layer.", layer.base_layer
        return prefix

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attributes:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_attributes:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield item
            else:
                yield from item.parameters()

    # -- adapter lifecycle ----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def graph_key(self) -> Hashable | None:
        """Everything besides tensors that this layer's forward depends on, as a hashable value, for
        replaying its block as a CUDA graph (kernels/block_graphs.py); None: it cannot be replayed.
        A method whose forward reads only its tensors and the state below may return this."""
        return None

    def _plain_graph_key(self) -> tuple | None:
        if self.row_adapters is not None:  # a mixed batch: rows are routed per call
            return None
        return (type(self), tuple(self.active_adapters), tuple(self.merged_adapters), self.disabled)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_refusal(self, adapter_name: str) -> str | None:
        """Why this layer cannot delete the adapter now, or None. The wrapper asks every layer
        before it deletes anything, so a refused delete changes nothing."""
        if adapter_name in self.merged_adapters:
            return f"Adapter {adapter_name!r} is merged; unmerge before deleting it."
        return None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"Adapter {adapter_name!r} is merged; unmerge before deleting it.")
        for attr in self.adapter_attributes:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def mixed_batch_stacks(self) -> object | None:
        """The stacked adapters this layer's latest mixed batch used; None for layers that stack
        none (those keep a `_mixed_stacks` StackCache, see mixed_batch.py)."""
        cache = self.__dict__.get("_mixed_stacks")
        return None if cache is None else cache.current

    def active_unmerged(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # -- merging --------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} cannot be merged into the base weights; keep it unmerged "
            f"(its output is computed beside the base layer)."
        )

    def merge_adapter(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        weight.data += self.delta_weight(adapter_name).to(weight.dtype)

    def unmerge_adapter(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        weight.data -= self.delta_weight(adapter_name).to(weight.dtype)

    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.adapter_names and name not in self.merged_adapters:
                self.merge_adapter(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        # Undo in reverse order: multiplicative deltas (IA3, DoRA) do not commute with additive ones.
        while self.merged_adapters:
            self.unmerge_adapter(self.merged_adapters.pop())

    # -- files ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors of one adapter, keyed relative to this layer with the adapter name left out."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.adapter_attributes:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, (nn.Parameter, torch.Tensor)):
                state[attr] = item
            else:
                for key, tensor in item.state_dict(keep_vars=True).items():
                    state[f"{attr}.{key}"] = tensor
        return state


class ModulesToSave(DeltaLayer):
    """A module trained in full beside an adapter (e.g. a classifier head): one copy per adapter.

    Saved under the module's own path (e.g. `classifier.weight`), as peft does.
    """

    adapter_attributes = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    def add_adapter(self, adapter_name: str, config=None, module_name: str = "") -> None:
        trained_copy = copy.deepcopy(self.get_base_layer())
        for param in trained_copy.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = trained_copy

    supports_mixed_batch = True

    def forward(self, *args, **kwargs):
        # A subclass that cannot route rows is switched off (disabled) for a mixed batch instead.
        if self.row_adapters is not None and self.supports_mixed_batch:
            return self._mixed_forward(self.row_adapters, *args, **kwargs)
        active = self.active_unmerged()
        if not active:
            return self.base_layer(*args, **kwargs)
        if len(active) > 1:
            raise RuntimeError(
                f"Several active adapters ({active}) each train their own copy of this module; "
                f"activate one of them, or give only one of them modules_to_save."
            )
        return self.modules_to_save[active[0]](*args, **kwargs)

    def _mixed_forward(self, rows: RowAdapters, x: torch.Tensor, *args, **kwargs):
        # Each row goes through its adapter's copy (or the original): one call per distinct adapter.
        rows.check_batch(x, "a modules_to_save copy")
        output = None
        for name, index in rows.groups(x.device):
            if name is not None and name not in self.modules_to_save:
                name = None  # an adapter without its own copy of this module uses the original
            module = self.base_layer if name is None else self.modules_to_save[name]
            part = module(x.index_select(0, index), *args, **kwargs)
            if output is None:
                output = part.new_empty((x.shape[0], *part.shape[1:]))
            output.index_copy_(0, index, part)
        return output

    def merge_adapter(self, adapter_name: str) -> None:
        # "Merging" a fully trained copy means making it the module: swap parameters in place.
        source = dict(self.modules_to_save[adapter_name].named_parameters())
        for name, param in self.get_base_layer().named_parameters():
            original = param.data.clone()
            param.data.copy_(source[name].data)
            source[name].data.copy_(original)

    unmerge_adapter = merge_adapter  # swapping twice restores the original

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))
