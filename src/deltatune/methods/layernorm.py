"""LayerNorm tuning (e.g. Zhao et al. 2023): train only the normalisation layers' weights and biases.

Targets every module whose class name contains "Norm" (LayerNorm, LlamaRMSNorm, T5LayerNorm,
GroupNorm, ...). Each keeps its weight and bias frozen and gains trainable zero-initialised
deltas; forward runs the norm's own code with weight + delta swapped in (torch.func.functional_call),
so any norm formula works and the base stays bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_norm
from ..inject import inject_layers, plain_modules
from ..layer import DeltaLayer, adapter_dtype
from ..registry import MethodInfo, register_method


@dataclass
class LayerNormTuningConfig(AdapterConfig):
    """target_modules: None for every normalisation layer with a learnable weight, or names.
    train_bias: train the norms' biases too, where they have one (RMSNorm has none)."""

    method = "layernorm"
    peft_type = "LAYERNORM"

    train_bias: bool = True


def _is_norm(module: nn.Module) -> bool:
    return is_norm(module) and isinstance(getattr(module, "weight", None), torch.Tensor)




class NormTuningLayer(DeltaLayer):
    """Trainable deltas of one norm's weight (and bias) per adapter."""

    adapter_attributes = ("norm_weight_delta", "norm_bias_delta")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.norm_weight_delta = nn.ParameterDict()
        self.norm_bias_delta = nn.ParameterDict()
        # Tensors as they were before each merge, so unmerge restores them exactly.
        self._before_merge: dict[str, dict[str, torch.Tensor]] = {}

    def _base_tensors(self) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        return {attr: t for attr in ("weight", "bias") if isinstance(t := getattr(base, attr, None), torch.Tensor)}

    def _deltas(self, adapter_name: str) -> dict[str, nn.Parameter]:
        containers = {"weight": self.norm_weight_delta, "bias": self.norm_bias_delta}
        return {attr: c[adapter_name] for attr, c in containers.items() if adapter_name in c}

    def add_adapter(self, adapter_name: str, config: LayerNormTuningConfig, module_name: str) -> None:
        base = self.get_base_layer()
        tensors = self._base_tensors()
        if "weight" not in tensors:
            raise ConfigError(
                f"Module {module_name!r} ({type(base).__name__}) has no learnable weight to tune; "
                "leave it out of target_modules (LayerNorm tuning targets normalisation layers)."
            )
        for attr, container in (("weight", self.norm_weight_delta), ("bias", self.norm_bias_delta)):
            if attr in tensors and (attr == "weight" or config.train_bias):
                tensor = tensors[attr]
                container[adapter_name] = nn.Parameter(torch.zeros(tensor.shape, device=tensor.device, dtype=adapter_dtype(tensor)))

    def forward(self, *args, **kwargs):
        active = [n for n in self.active_unmerged() if n in self.norm_weight_delta]
        if not active:
            return self.base_layer(*args, **kwargs)
        swapped = {}
        for attr, tensor in self._base_tensors().items():
            value = tensor
            for name in active:
                delta = self._deltas(name).get(attr)
                if delta is not None:
                    value = value + delta.to(tensor.dtype)
            swapped[self.inner_prefix() + attr] = value
        return functional_call(self.base_layer, swapped, tuple(args), kwargs)

    def merge_adapter(self, adapter_name: str) -> None:
        tensors = self._base_tensors()
        deltas = self._deltas(adapter_name)
        self._before_merge[adapter_name] = {attr: tensors[attr].detach().clone() for attr in deltas}
        for attr, delta in deltas.items():
            tensors[attr].data += delta.detach().to(tensors[attr].dtype)

    def unmerge_adapter(self, adapter_name: str) -> None:
        tensors = self._base_tensors()
        for attr, original in self._before_merge.pop(adapter_name).items():
            tensors[attr].data.copy_(original)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._before_merge.pop(adapter_name, None)


def _norm_pattern(model: nn.Module) -> str:
    """A regex of the exact names of the model's normalisation layers (inside no other wrapper)."""
    names = []
    for name, module in plain_modules(model):
        if not name:
            continue
        if isinstance(module, DeltaLayer):
            module = module.get_base_layer()
        if _is_norm(module):
            names.append(name)
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no normalisation layer with a learnable weight (no module class named "
            "'*Norm*'), so LayerNorm tuning would train nothing; give target_modules or pick another method."
        )
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def attach(model: nn.Module, config: LayerNormTuningConfig, adapter_name: str, **_: object) -> None:
    fallback = _norm_pattern(model) if config.target_modules is None else None
    inject_layers(model, config, adapter_name, lambda m: NormTuningLayer if _is_norm(m) else None, fallback)


register_method(
    MethodInfo(
        name="layernorm",
        config_class=LayerNormTuningConfig,
        attach=attach,
        kind="selective",
        description="Train only the normalisation layers' weights and biases",
        compare_defaults={"train_bias": True, "lr": 5e-3},
    )
)
