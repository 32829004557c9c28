"""Pieces shared by the layers that run one adapter per batch row (see `layer.RowAdapters`).

A supporting layer stacks the tensors of its adapters named in the batch along a leading "slot"
dimension: slot k holds the layer's k-th such adapter and one last slot leaves a row unchanged
(zeros for additive deltas, ones for scalings). Rows then gather their slot, so the work grows
with the number of distinct adapters at most, never with a Python loop over rows. A row whose
adapter this layer does not hold uses that last slot too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Container, Generic, Iterable, Sequence, TypeVar

import torch

from .layer import RowAdapters, index_tensor

Stacks = TypeVar("Stacks")


@dataclass(frozen=True)
class SlotPlan:
    """How the rows of one mixed batch map onto one layer's slots.

    names: the layer's adapters among the batch's, in slot order; slot len(names) is "unchanged".
    row_slot: (batch,) LongTensor, each row's slot.
    rows: the batch's routing, which makes (and rewrites in place, RowAdapters.assign) every
    tensor derived from the slots.
    """

    names: tuple[str, ...]
    row_slot: torch.Tensor
    rows: RowAdapters = field(compare=False, repr=False)

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """(batch, len(names)) with a 1 at each row's adapter; all zeros for unchanged rows."""
        count = len(self.names)

        def make() -> torch.Tensor:
            return torch.nn.functional.one_hot(self.row_slot, count + 1)[:, :count].to(dtype)

        return self.rows.derive(("one_hot", self.names, dtype, str(self.row_slot.device)), make)

    def gather(self, per_slot: torch.Tensor) -> torch.Tensor:
        """Each row's entry of a tensor indexed by slot in its first dimension: (batch, ...).
        index_select rather than indexing: on CPU it copies several times faster."""
        return per_slot.index_select(0, self.row_slot)

    def row_mask(self, slot_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) bool: the rows whose slot is set in `slot_mask` (one bool per slot)."""
        return self.gather(slot_mask)


def plan_slots(rows: RowAdapters, held: Container[str], device: torch.device) -> SlotPlan | None:
    """The slot plan of `rows` for a layer holding the adapters in `held`; None if it holds none of them."""
    names = tuple(name for name in rows.names if name in held)
    if not names:
        return None
    batch_slots = rows.slot_index(device)
    if len(names) == len(rows.names):
        # The batch's slots are the layer's slots (base rows included: both are len(names)).
        return SlotPlan(names, batch_slots, rows)
    local = index_tensor([names.index(n) if n in names else len(names) for n in rows.names] + [len(names)], device)
    return SlotPlan(names, rows.derive(("local_slots", names, str(device)), lambda: local[batch_slots]), rows)


def tensor_versions(tensors: Iterable[torch.Tensor]) -> tuple:
    """Storage and in-place version of each tensor: changes when any of them is moved (`.to()`)
    or written in place through autograd-visible ops (optimizer steps, `copy_`). Writes through
    `.data`, and tensor objects replaced behind the layer's back, need `StackCache.clear()`."""
    tensors = list(tensors)
    # map() over C functions: a layer checks every adapter's tensors (a mixed batch over 32
    # adapters: 64 per layer) before each new routing, and a generator's frames cost 2x more.
    return (*map(torch.Tensor.data_ptr, tensors), *map(_version_of, tensors))


_version_of = operator.attrgetter("_version")


def needs_autograd(tensors: Iterable[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class StackCache(Generic[Stacks]):
    """One layer's stacked tensors and slot plan for the latest mixed batch, reused while valid.

    The plan is reused for the same RowAdapters (one forward or generate call: token-by-token
    generation reaches every layer once per token, which must not restack or recheck). The stacks
    are reused across calls while the adapters are the same tensors at the same versions, so a new
    forward with the same adapters costs one cheap check per layer. Nothing is kept while autograd
    needs the stacks: a stored graph could not be backpropagated twice.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        # What describe(names) said, per set of names: looking tensors up through ModuleDicts costs
        # more than checking their versions, and the layer clears this whenever its adapters change
        # (add, delete, merge, unmerge). A Parameter object replaced behind the layer's back
        # (rather than written into) needs clear() too.
        self._described: dict[tuple[str, ...], tuple[tuple, Sequence[torch.Tensor]]] = {}
        self._rows: RowAdapters | None = None
        self._entry: tuple[Stacks, SlotPlan] | None = None
        self._key: tuple | None = None
        self._stacks: Stacks | None = None

    @property
    def current(self) -> Stacks | None:
        """The stacks the latest mixed batch used (None before one, or while autograd needed them)."""
        return self._stacks

    def get(
        self,
        rows: RowAdapters,
        held: Container[str],
        device: torch.device,
        describe: Callable[[tuple[str, ...]], tuple[tuple, Sequence[torch.Tensor]]],
        build: Callable[[tuple[str, ...]], Stacks],
    ) -> tuple[Stacks, SlotPlan] | None:
        """(stacks, plan) for `rows`, or None when the layer holds none of the rows' adapters.

        describe(names) gives a hashable key of everything the stacks depend on besides tensors
        (scalings, flags) and the tensors they are built from; build(names) stacks them.
        """
        if rows is self._rows:
            return self._entry
        plan = plan_slots(rows, held, device)
        if plan is None:
            self._rows, self._entry = rows, None
            return None
        if plan.names not in self._described:
            self._described[plan.names] = describe(plan.names)
        key, tensors = self._described[plan.names]
        if needs_autograd(tensors):
            self.clear()
            return build(plan.names), plan
        full_key = (plan.names, key, str(device), torch.is_inference_mode_enabled(), tensor_versions(tensors))
        if full_key != self._key:
            self._key, self._stacks = full_key, build(plan.names)
        self._rows, self._entry = rows, (self._stacks, plan)
        return self._entry


class InputGroup:
    """Sibling layers that a model calls on the same input tensor in turn (a block's q/k/v
    projections; its gate/up), as hf_compat.shared_input_siblings names them.

    The first of them to see an input computes a part for each (LoRA, in a captured decode step:
    one shrink launch for all three), and each takes its own while the input is the very same
    tensor object. Matched by object, not by value: a model that wrote into x in place between
    its siblings' calls would get parts of the old x (the models of hf_compat's table do not)."""

    def __init__(self, layers: Sequence[object]) -> None:
        self.layers = tuple(layers)
        self.clear()

    def clear(self) -> None:
        self._input: torch.Tensor | None = None  # held while parts are left: an id is unique only while its object lives
        self._parts: dict[int, object] = {}

    def part(self, layer: object, x: torch.Tensor, compute: Callable[[], Sequence[object] | None]) -> object | None:
        """`layer`'s part for input x. compute() gives one part per layer of the group, in order
        (None: they cannot share this input); it runs when x is new or this layer took its part."""
        if self._input is not x or id(layer) not in self._parts:
            parts = compute()
            if parts is None:
                self.clear()
                return None
            self._input, self._parts = x, {id(member): part for member, part in zip(self.layers, parts)}
        part = self._parts.pop(id(layer), None)
        if not self._parts:
            self.clear()  # every sibling has its part: hold neither x nor the parts any longer
        return part


def rows_by_tokens(x: torch.Tensor) -> torch.Tensor:
    """x as (batch, tokens, features): every dimension between the first and last is tokens."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_row(plan: SlotPlan, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values (slots, features) gathered per row and shaped to broadcast over `like` (batch, ..., features)."""
    gathered = plan.gather(values)
    return gathered.view(gathered.shape[0], *([1] * (like.dim() - 2)), gathered.shape[-1])


def select_per_row(
    plan: SlotPlan, variants: Sequence[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]], x: torch.Tensor
) -> torch.Tensor:
    """Apply to each row of x the function of its slot: variants are (slot mask, function) pairs
    covering every slot once. Each function runs on the whole batch and rows pick their result,
    so the cost is one pass per distinct function (a handful), not per row."""
    _, first = variants[0]
    if len(variants) == 1:
        return first(x)
    result = first(x)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    for slot_mask, function in variants[1:]:
        result = torch.where(plan.row_mask(slot_mask).view(shape), function(x), result)
    return result
