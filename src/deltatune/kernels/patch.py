"""Swap fused RMSNorm, SwiGLU and rotary embedding into Llama-family HF models, and back.

Modules are patched by giving them a subclass of their own class whose ``forward`` calls the fused
function (``isinstance`` checks, hooks, parameters and state-dict keys are untouched); unpatching
restores the original class. Rotary embedding is a module-level function in HF's modeling files,
so it is replaced there, reference-counted over the models patched. Every replacement computes the
same function as the code it replaces (see tests/test_kernels.py).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import torch
from torch import nn

from .fused_ops import rms_norm, rotary_embedding, swiglu
from .lora_mlp import lora_fast_params, lora_mlp

__all__ = ["patch_model_for_training", "unpatch_model", "is_patched"]

# HF classes whose forward is exactly the Llama code the fused functions reproduce
_RMS_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_ROTARY_MODULES = {
    "llama": "transformers.models.llama.modeling_llama",
    "mistral": "transformers.models.mistral.modeling_mistral",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
    "qwen3": "transformers.models.qwen3.modeling_qwen3",
}
_PATCHED_FLAG = "_deltatune_patched_modules"


def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:
        return super(type(self), self).forward(hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    projections = [lora_fast_params(p) for p in (self.gate_proj, self.up_proj, self.down_proj)]
    if all(p is not None and (len(p) < 6 or not p[5] or not self.training) for p in projections):
        # all three are LoRA layers without active dropout: the whole MLP is one autograd node
        return lora_mlp(x, *(p[:5] for p in projections))
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_fused_subclasses: dict[type, type] = {}


def _fused_subclass(original: type, forward: Callable) -> type:
    if original not in _fused_subclasses:
        _fused_subclasses[original] = type(
            original.__name__, (original,), {"forward": forward, "_deltatune_original_class": original}
        )
    return _fused_subclasses[original]


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _fused_forward_for(module: nn.Module) -> Callable | None:
    name = type(module).__name__
    if name in _RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
        return _fused_rms_norm_forward
    if name in _MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
        if all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return _fused_mlp_forward
    return None


# ----------------------------------------------------------------------------- rotary (module level)
_rotary_originals: dict[str, Callable] = {}
_rotary_users: dict[str, int] = {}


def _make_fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if unsqueeze_dim != 1 or kwargs or q.dim() != 4 or cos.dim() != 3 or q.shape[-1] != cos.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        return rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)

    apply_rotary_pos_emb._deltatune_fused = True
    return apply_rotary_pos_emb


def _patch_rotary(model_type: str) -> bool:
    module_name = _ROTARY_MODULES.get(model_type)
    if module_name is None:
        return False
    try:
        modeling = importlib.import_module(module_name)
    except ImportError:
        return False
    if not hasattr(modeling, "apply_rotary_pos_emb"):
        return False
    if _rotary_users.get(module_name, 0) == 0:
        _rotary_originals[module_name] = modeling.apply_rotary_pos_emb
        modeling.apply_rotary_pos_emb = _make_fused_rotary(modeling.apply_rotary_pos_emb)
    _rotary_users[module_name] = _rotary_users.get(module_name, 0) + 1
    return True


def _unpatch_rotary(model_type: str) -> None:
    module_name = _ROTARY_MODULES[model_type]
    _rotary_users[module_name] -= 1
    if _rotary_users[module_name] == 0:
        sys.modules[module_name].apply_rotary_pos_emb = _rotary_originals.pop(module_name)


# ----------------------------------------------------------------------------- public
def _hf_model_types(model: nn.Module) -> set[str]:
    types = set()
    for module in model.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            types.add(model_type)
    return types


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _PATCHED_FLAG, None) is not None


def patch_model_for_training(model: nn.Module) -> nn.Module:
    """Use fused RMSNorm / SwiGLU / rotary in every Llama, Mistral, Qwen2 or Qwen3 block of ``model``.

    Returns the same model, changed in place. Idempotent; :func:`unpatch_model` undoes it exactly.
    Modules of other architectures are left alone. LoRA-wrapped projections inside the MLP are fine:
    the fused MLP calls ``gate_proj``/``up_proj``/``down_proj`` as modules.
    """
    if is_patched(model):
        return model
    swapped = []
    for module in model.modules():
        forward = _fused_forward_for(module)
        if forward is not None:
            module.__class__ = _fused_subclass(type(module), forward)
            swapped.append(module)
    rotary_types = sorted(t for t in _hf_model_types(model) if _patch_rotary(t))
    object.__setattr__(model, _PATCHED_FLAG, (swapped, rotary_types))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original classes and rotary functions patched by :func:`patch_model_for_training`."""
    record = getattr(model, _PATCHED_FLAG, None)
    if record is None:
        return model
    swapped, rotary_types = record
    for module in swapped:
        module.__class__ = module._deltatune_original_class
    for model_type in rotary_types:
        _unpatch_rotary(model_type)
    object.__delattr__(model, _PATCHED_FLAG)
    return model
