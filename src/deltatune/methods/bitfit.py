"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Each chosen module keeps its bias frozen and gains a trainable, zero-initialised delta that is
added to its output along the channel dimension. A bias is the last thing Linear, Conv1D,
convolutions and normalisation layers add, so this trains exactly what training the bias would,
while the base stays bit-identical. Llama-style models have no biases: that is an error naming
the option add_missing_biases, which gives the targeted linear layers zero-initialised biases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_norm, linear_out_features
from ..inject import find_targets, inject_layers, is_linear_like, output_head_names, plain_modules
from ..layer import DeltaLayer, adapter_dtype
from ..registry import MethodInfo, register_method

# Layers whose bias is added per channel along dim 1 (N, C, ...), not along the last dim.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass
class BitFitConfig(AdapterConfig):
    """target_modules: None for every bias of the model but the output head's (Linear, Conv1D,
    convolutions, normalisation layers), or names, e.g. ["query", "intermediate.dense"] to train
    only the query and MLP-intermediate biases.
    add_missing_biases: give targeted linear layers without a bias a zero-initialised one to
    train (Llama-style models have none). Merging such an adapter adds bias parameters to them.
    """

    method = "bitfit"
    peft_type = "BITFIT"

    add_missing_biases: bool = False


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _can_hold_bias(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, nn.modules.conv._ConvNd) or is_norm(module)




class BitFitLayer(DeltaLayer):
    """A trainable bias delta per adapter beside the frozen bias (or beside no bias at all)."""

    adapter_attributes = ("bias_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()
        self.channel_dim = 1 if isinstance(self.get_base_layer(), _CHANNEL_FIRST) else -1
        # The bias as it was before each merge (None: the layer had none), so unmerge is exact.
        self._bias_before_merge: dict[str, torch.Tensor | None] = {}

    def add_adapter(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        base = self.get_base_layer()
        bias = _bias(base)
        if bias is None and not (config.add_missing_biases and is_linear_like(base)):
            raise ConfigError(
                f"Module {module_name!r} ({type(base).__name__}) has no bias, so BitFit would train nothing there. "
                + ("Set add_missing_biases=True to give it a zero-initialised bias to train, or leave it out of target_modules."
                   if is_linear_like(base) else "Leave it out of target_modules.")
            )
        reference = bias if bias is not None else base.weight
        shape = bias.shape if bias is not None else (linear_out_features(base),)
        delta = torch.zeros(shape, device=reference.device, dtype=adapter_dtype(reference))
        self.bias_delta[adapter_name] = nn.Parameter(delta)

    def _broadcastable(self, delta: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == 1 and result.dim() > 2:
            return delta.view(-1, *([1] * (result.dim() - 2)))
        return delta

    def forward(self, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(*args, **kwargs)
        for name in self.active_unmerged():
            if name in self.bias_delta:
                result = result + self._broadcastable(self.bias_delta[name], result).to(result.dtype)
        return result

    def merge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        delta = self.bias_delta[adapter_name].detach()
        bias = _bias(base)
        if bias is None:
            reference = base.weight
            base.bias = nn.Parameter(delta.to(reference.dtype).clone(), requires_grad=False)
            self._bias_before_merge[adapter_name] = None
            return
        self._bias_before_merge[adapter_name] = bias.detach().clone()
        bias.data += delta.to(bias.dtype)

    def unmerge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        original = self._bias_before_merge.pop(adapter_name)
        if original is None:
            base.bias = None
        else:
            base.bias.data.copy_(original)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._bias_before_merge.pop(adapter_name, None)


def _default_target_pattern(model: nn.Module, config: BitFitConfig) -> str:
    """A regex of the exact names of every module that has (or, on request, may get) a bias."""
    skip = set(output_head_names(model)) | set(config.modules_to_save or [])
    names = []
    for name, module in plain_modules(model):
        if not name:
            continue
        if isinstance(module, DeltaLayer):
            module = module.get_base_layer()
        if any(name == s or name.endswith("." + s) for s in skip) or not _can_hold_bias(module):
            continue
        if _bias(module) is not None or (config.add_missing_biases and is_linear_like(module)):
            names.append(name)
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no bias terms outside its output head, so BitFit would train nothing. "
            "Set add_missing_biases=True to give its linear layers zero-initialised biases to train."
        )
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _check_targets(model: nn.Module, config: BitFitConfig, names: list[str]) -> None:
    """Refuse targets without a bias to train before any module is wrapped."""
    unwrapped = {n: model.get_submodule(n) for n in names}
    unwrapped = {n: m.get_base_layer() if isinstance(m, DeltaLayer) else m for n, m in unwrapped.items()}
    lacking = [n for n, m in unwrapped.items() if _bias(m) is None and _can_hold_bias(m)]
    if lacking and not config.add_missing_biases:
        raise ConfigError(
            f"{len(lacking)} targeted module(s) have no bias, e.g. {lacking[:3]}, so BitFit would train nothing there. "
            "Set add_missing_biases=True to give linear layers a zero-initialised bias to train, or leave them out of target_modules."
        )
    unsupported = [n for n, m in unwrapped.items() if not _can_hold_bias(m) or (_bias(m) is None and not is_linear_like(m))]
    if unsupported:
        raise ConfigError(
            f"BitFit trains biases of linear, convolution and normalisation layers; {unsupported[:3]} "
            f"({', '.join(sorted({type(unwrapped[n]).__name__ for n in unsupported}))}) have none to train. Leave them out of target_modules."
        )


def attach(model: nn.Module, config: BitFitConfig, adapter_name: str, **_: object) -> None:
    fallback = _default_target_pattern(model, config) if config.target_modules is None else None
    _check_targets(model, config, find_targets(model, config, fallback))
    inject_layers(model, config, adapter_name, BitFitLayer, fallback)


register_method(
    MethodInfo(
        name="bitfit",
        config_class=BitFitConfig,
        attach=attach,
        kind="selective",
        description="Train only the bias terms (zero-init biases added on request where a model has none)",
        # Llama-shaped models have no biases: the comparison gives their linear layers zero-init ones.
        compare_defaults={"add_missing_biases": True, "lr": 5e-3},
    )
)
