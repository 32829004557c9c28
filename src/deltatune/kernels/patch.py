"""Swap fused RMSNorm, gated MLP (SwiGLU/GeGLU, one node with LoRA) and rotary embedding into one
model's blocks, and back.

Scoped to the modules of the one model given: each replaced module gets a subclass of its own
class whose ``forward`` calls the fused function (``isinstance`` checks, hooks, parameters and
state-dict keys are untouched), and unpatching restores the original class. Nothing outside the
model changes: no transformers class, module or function is modified, so another model in the
same process runs exactly the code it ran before.

Rotary embedding is a module-level function that the attention's forward looks up in its
modeling file's globals. The attention modules of the patched model get a copy of that forward
whose globals map ``apply_rotary_pos_emb`` to the fused function; the modeling file keeps its own.

Which classes may be replaced is the architecture table's business (hf_compat.FusedBlock): only
classes whose code is exactly what the fused functions reproduce (tests/test_kernels.py).
"""

from __future__ import annotations

import inspect
import types
from typing import Callable

import torch
from torch import nn

from .. import hf_compat
from .block_graphs import BlockGraphs
from .fused_ops import gated_activation, rms_norm, rotary_embedding
from .lora_linear import LoraParams
from .lora_mlp import lora_fast_params, lora_mlp, takes_input

__all__ = ["patch_model_for_training", "unpatch_model", "is_patched", "patched_modules", "release_block_graphs",
           "block_graph_speedups"]

_PATCHED_FLAG = "_deltatune_patched_modules"
_ORIGINAL_CLASS = "_deltatune_original_class"
_BLOCK_GRAPHS = "_deltatune_block_graphs"


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:
        return super(type(self), self).forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_unit_offset_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Gemma's norm: the scale is applied in float32, so any input dtype takes the fused path
    return rms_norm(hidden_states, self.weight, self.eps, unit_offset=True)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    activation = hf_compat.gated_activation(self.act_fn)
    projections = [lora_fast_params(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(p is not None and (p.dropout_p == 0 or not self.training) for p in projections) and takes_input(x, *projections):
        # all three are LoRA layers without active dropout (none, or in eval mode), over weights or
        # 4-bit bases that compute in x's dtype: one autograd node
        return lora_mlp(x, *(p._replace(dropout_p=0.0) for p in projections), activation=activation)
    return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), activation))


def _row_halves(params: LoraParams) -> tuple[LoraParams, LoraParams]:
    """A LoRA projection whose output rows stack two projections (Phi-3's gate_up_proj: gate, then
    up) as two LoRA projections over views: they share A, each takes its half of W, b and B."""
    half = params.weight.shape[0] // 2
    bias = params.bias

    def rows(part: slice) -> LoraParams:
        return params._replace(weight=params.weight[part], bias=None if bias is None else bias[part],
                               lora_b=params.lora_b[part], dropout_p=0.0)

    return rows(slice(0, half)), rows(slice(half, None))


def _fused_gate_up_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    # Phi-3: up * act(gate) with gate and up the two halves of one gate_up_proj
    activation = hf_compat.gated_activation(self.activation_fn)
    gate_up, down = lora_fast_params(self.gate_up_proj), lora_fast_params(self.down_proj)
    # a 4-bit gate_up_proj cannot be split into two row views: its own forward runs then
    if all(p is not None and isinstance(p.weight, torch.Tensor) and (p.dropout_p == 0 or not self.training)
           for p in (gate_up, down)):
        return lora_mlp(x, *_row_halves(gate_up), down._replace(dropout_p=0.0), activation=activation)
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(gated_activation(gate, up, activation))


def _make_fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if unsqueeze_dim != 1 or kwargs or q.dim() != 4 or cos.dim() != 3 or q.shape[-1] != cos.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        return rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)

    return apply_rotary_pos_emb


def _with_global(function: Callable, name: str, value: object) -> Callable:
    """A copy of `function` that sees `value` as its global `name`, through decorator wrappers
    (functools.wraps-style, which keep the wrapped function in `__wrapped__` and a closure cell)."""
    wrapped = getattr(function, "__wrapped__", None)
    closure = function.__closure__
    if wrapped is not None and closure:
        inner = _with_global(wrapped, name, value)
        cells = []
        for cell in closure:
            try:
                cells.append(types.CellType(inner) if cell.cell_contents is wrapped else cell)
            except ValueError:  # an empty cell
                cells.append(cell)
        scope, closure = function.__globals__, tuple(cells)
    else:
        inner, scope = None, {**function.__globals__, name: value}
    copy = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__, closure)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = function.__qualname__
    if inner is not None:
        copy.__wrapped__ = inner
    return copy


_fused_subclasses: dict[type, type] = {}


def _fused_subclass(original: type, forward: Callable) -> type:
    # One subclass per original class, so every patched module of a class shares it (and
    # torch.compile sees one class). The original class itself is never modified.
    if original not in _fused_subclasses:
        _fused_subclasses[original] = type(original.__name__, (original,), {"forward": forward, _ORIGINAL_CLASS: original})
    return _fused_subclasses[original]


def _graphed_block_call(self, *args, **kwargs):
    # a checkpointed block in training replays as CUDA graphs where block_graphs says it may
    graphs = self.__dict__.get(_BLOCK_GRAPHS)
    if graphs is not None:
        out = graphs.call(self, args, kwargs)
        if out is not NotImplemented:
            return out
    return super(type(self), self).__call__(*args, **kwargs)


_graphed_subclasses: dict[type, type] = {}


def _graphed_subclass(original: type) -> type:
    # __call__, not forward: transformers checkpoints the forward (5.24) or __call__ (5.17) of
    # its layers, and the graphs replace both; the original __call__ runs whenever they step aside
    if original not in _graphed_subclasses:
        _graphed_subclasses[original] = type(original.__name__, (original,), {"__call__": _graphed_block_call, _ORIGINAL_CLASS: original})
    return _graphed_subclasses[original]


def _fused_attention_forward(attention_class: type) -> Callable | None:
    forward = attention_class.forward
    rotary = inspect.unwrap(forward).__globals__.get("apply_rotary_pos_emb")
    if rotary is None:
        return None
    return _with_global(forward, "apply_rotary_pos_emb", _make_fused_rotary(rotary))


def _fused_forward_for(module: nn.Module, classes: dict[type, str]) -> Callable | None:
    role = classes.get(type(module))  # exact classes: a subclass may have changed the forward
    if role == "norm" and hasattr(module, "variance_epsilon"):
        return _fused_rms_norm_forward
    if role == "unit_offset_norm" and hasattr(module, "eps"):
        return _fused_unit_offset_norm_forward
    if role == "mlp" and hf_compat.gated_activation(getattr(module, "act_fn", None)) is not None:
        if all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return _fused_mlp_forward
    if role == "mlp" and hf_compat.gated_activation(getattr(module, "activation_fn", None)) is not None:
        if all(hasattr(module, p) for p in ("gate_up_proj", "down_proj")):
            return _fused_gate_up_mlp_forward
    if role == "attention":
        return _fused_attention_forward(type(module))
    return None


def _patchable_classes(model: nn.Module) -> dict[type, str]:
    """Classes of the model's (and its sub-models') architectures that the fused path may replace."""
    classes: dict[type, str] = {}
    for module in model.modules():
        found = hf_compat.fused_classes(module) if getattr(module, "config", None) is not None else None
        if found is not None:
            norm, mlp, attention = found
            norm_role = "unit_offset_norm" if hf_compat.fused_block(module).norm_unit_offset else "norm"
            classes.update({norm: norm_role, mlp: "mlp", attention: "attention"})
    return classes


# ----------------------------------------------------------------------------- public
def is_patched(model: nn.Module) -> bool:
    return getattr(model, _PATCHED_FLAG, None) is not None


def patched_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` currently running a fused forward."""
    return list(getattr(model, _PATCHED_FLAG, None) or [])


def has_fused_path(model: nn.Module) -> bool:
    """Whether the architecture table lists fusable classes for this model."""
    return bool(_patchable_classes(model))


def patch_model_for_training(model: nn.Module) -> nn.Module:
    """Use fused RMSNorm / gated MLP (one-node LoRA MLP) / rotary in the blocks of ``model`` whose
    architecture has a fused path in hf_compat's table (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3).

    Returns the same model, changed in place and only there. Idempotent; :func:`unpatch_model`
    undoes it exactly. Modules of other architectures are left alone. LoRA-wrapped projections
    inside the MLP are fine: the fused MLP calls ``gate_proj``/``up_proj``/``down_proj`` as modules.
    """
    if is_patched(model):
        return model
    classes = _patchable_classes(model)
    swapped = []
    for module in model.modules():
        forward = _fused_forward_for(module, classes)
        if forward is not None:
            module.__class__ = _fused_subclass(type(module), forward)
            swapped.append(module)
    graphs = BlockGraphs()
    for block in _graphable_blocks(model, classes):
        block.__class__ = _graphed_subclass(type(block))
        block.__dict__[_BLOCK_GRAPHS] = graphs
        swapped.append(block)
    object.__setattr__(model, _PATCHED_FLAG, swapped)
    return model


def _graphable_blocks(model: nn.Module, classes: dict[type, str]) -> list[nn.Module]:
    """The checkpointable blocks that hold modules of a fused architecture (their code is known)."""
    fused = {module for module in model.modules() if type(module) in classes or getattr(type(module), _ORIGINAL_CLASS, None) in classes}
    return [block for block in hf_compat.checkpointable_blocks(model) if any(m in fused for m in block.modules())]


def _model_graphs(model: nn.Module) -> list[BlockGraphs]:
    found = {id(graphs): graphs for module in model.modules()
             if (graphs := module.__dict__.get(_BLOCK_GRAPHS)) is not None}
    return list(found.values())


def release_block_graphs(model: nn.Module, keep_measurements: bool = False) -> int:
    """Drop the CUDA graphs of `model`'s checkpointed blocks (and their memory pool); blocks capture
    again, if it pays, as their shapes repeat. With `keep_measurements`, what replaying was measured
    to gain per shape is kept, so the same shapes are captured again without a new measurement.
    Returns how many graph pairs were dropped."""
    found = _model_graphs(model)
    dropped = sum(len(graphs.captured) for graphs in found)
    for graphs in found:
        graphs.clear(keep_measurements)
    return dropped


def block_graph_speedups(model: nn.Module) -> dict[str, float]:
    """Per block class and input shape: how much faster replaying was measured to be (captured
    where >= block_graphs.MIN_SPEEDUP). Empty before any shape was seen twice in training."""
    speedups = {}
    for graphs in _model_graphs(model):
        for (layout, _, block_type), speedup in graphs.speedups.items():
            tensors = [entry for entry in layout if entry[1] == "t"]  # (name, "t", shape, dtype, device)
            label = f"{block_type.__name__} {tuple(tensors[0][2]) if tensors else ()}"
            while label in speedups:  # other constants or dtypes, one shape
                label += "'"
            speedups[label] = speedup
    return speedups


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original class of every module :func:`patch_model_for_training` changed."""
    swapped = getattr(model, _PATCHED_FLAG, None)
    if swapped is None:
        return model
    for module in swapped:
        module.__class__ = getattr(type(module), _ORIGINAL_CLASS)
        graphs = module.__dict__.pop(_BLOCK_GRAPHS, None)
        if graphs is not None:
            graphs.clear()
    object.__delattr__(model, _PATCHED_FLAG)
    return model
