"""(IA)³ (Liu et al. 2022): learned per-channel scaling of keys, values and the feed-forward
intermediate activation, initialised to ones so the model starts unchanged.

Keys and values are scaled at the output of their projections; the feed-forward activation is
scaled at the input of the feed-forward output projection ("feedforward_modules"). Files match
Hugging Face peft's IA3 (peft_type "IA3", tensors `<path>.ia3_l`, the same config fields and the
same vector shapes), so adapters move both ways. Mergeable: a scaling of a weight's rows
(outputs) or columns (inputs). In mixed batches (adapter_names=...) each row gathers its
adapter's vectors from a stack that has a slot of ones for rows without an adapter.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_conv1d, model_type, role_patterns, suffix_regex
from ..inject import inject_layers, is_linear_like
from ..layer import DeltaLayer, RowAdapters, adapter_dtype
from ..mixed_batch import StackCache, per_row
from ..model import written_out_targets
from ..registry import MethodInfo, register_method



@dataclass
class IA3Config(AdapterConfig):
    """target_modules: None for the architecture's keys, values and feed-forward output projection.
    feedforward_modules: targets scaled at their input (the feed-forward activation) rather than
        their output; None for the architecture's default. Must be among target_modules.
    fan_in_fan_out: read for peft compatibility; GPT-2's Conv1D layout is detected by itself.
    init_ia3_weights: True starts every vector at ones (the model unchanged); False random (tests)."""

    method = "ia3"
    peft_type = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if stray:
                raise ConfigError(f"feedforward_modules {stray} are not in target_modules {self.target_modules}; add them there too.")


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)




@dataclass(frozen=True)
class _ScaleStacks:
    """One layer's IA3 vectors stacked for a mixed batch: (slots + 1, features), ones where a slot's
    adapter scales the other side and in the last slot; None when no adapter scales that side."""

    input_scale: torch.Tensor | None
    output_scale: torch.Tensor | None


class IA3Layer(DeltaLayer):
    """Scales a Linear's (or GPT-2 Conv1D's) outputs, or for feed-forward targets its inputs."""

    adapter_attributes = ("ia3_l",)
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        # Weights kept at merge time only when a vector holds zeros (dividing could not undo it).
        self._weights_before_merge: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._mixed_stacks: StackCache[_ScaleStacks] = StackCache()

    def add_adapter(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        self._mixed_stacks.clear()
        feedforward = _matches(module_name, config.feedforward_modules)
        weight = self.get_base_layer().weight
        # peft's shapes: (1, in) for feed-forward targets, (out, 1) otherwise.
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        vector = torch.ones(shape, **kwargs) if config.init_ia3_weights else torch.randn(shape, **kwargs)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.is_feedforward[adapter_name] = feedforward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(self.row_adapters, x, *args, **kwargs)
        active = [n for n in self.active_unmerged() if n in self.ia3_l]
        input_scale = output_scale = None
        for name in active:
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                input_scale = vector if input_scale is None else input_scale * vector
            else:
                output_scale = vector if output_scale is None else output_scale * vector
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if output_scale is not None:
            result = (result.to(output_scale.dtype) * output_scale).to(result.dtype)
        return result

    # -- mixed batches: one adapter per row ------------------------------------------------
    def _mixed_forward(self, rows: RowAdapters, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows.check_batch(x, lambda: f"IA3 layer {type(self.get_base_layer()).__name__}({self.in_features} -> {self.out_features})")
        found = self._mixed_stacks.get(rows, self.ia3_l.keys(), x.device, self._stack_key, self._build_stacks)
        if found is None:  # no row's adapter is on this layer
            return self.base_layer(x, *args, **kwargs)
        stacks, plan = found
        # The same arithmetic as forward, with each row's vector: ones leave a row unchanged.
        if stacks.input_scale is not None:
            x = (x.to(stacks.input_scale.dtype) * per_row(plan, stacks.input_scale, x)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if stacks.output_scale is not None:
            result = (result.to(stacks.output_scale.dtype) * per_row(plan, stacks.output_scale, result)).to(result.dtype)
        return result

    def _stack_key(self, names: tuple[str, ...]) -> tuple[tuple, list[torch.Tensor]]:
        return tuple(self.is_feedforward[n] for n in names), [self.ia3_l[n] for n in names]

    def _build_stacks(self, names: tuple[str, ...]) -> _ScaleStacks:
        return _ScaleStacks(
            input_scale=self._scale_stack(names, feedforward=True, features=self.in_features),
            output_scale=self._scale_stack(names, feedforward=False, features=self.out_features),
        )

    def _scale_stack(self, names: tuple[str, ...], feedforward: bool, features: int) -> torch.Tensor | None:
        vectors = {slot: self.ia3_l[n].flatten() for slot, n in enumerate(names) if self.is_feedforward[n] == feedforward}
        if not vectors:
            return None
        first = next(iter(vectors.values()))
        stack = first.new_ones((len(names) + 1, features))
        for slot, vector in vectors.items():
            stack[slot] = vector
        return stack

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the stored weight (Conv1D stores it transposed)."""
        vector = self.ia3_l[adapter_name].detach()
        return vector.T if self.fan_in_fan_out else vector

    def merge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        vector = self.ia3_l[adapter_name].detach()
        if (vector == 0).any():
            bias = base.bias.detach().clone() if base.bias is not None else None
            self._weights_before_merge[adapter_name] = (base.weight.detach().clone(), bias)
        base.weight.data = (base.weight.data * self._weight_scale(adapter_name)).to(base.weight.dtype)
        # Scaling the output scales the bias too; scaling the input leaves it alone.
        if not self.is_feedforward[adapter_name] and base.bias is not None:
            base.bias.data = (base.bias.data * vector.flatten()).to(base.bias.dtype)

    def unmerge_adapter(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        if adapter_name in self._weights_before_merge:
            weight, bias = self._weights_before_merge.pop(adapter_name)
            base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)
            return
        vector = self.ia3_l[adapter_name].detach()
        base.weight.data = (base.weight.data / self._weight_scale(adapter_name)).to(base.weight.dtype)
        if not self.is_feedforward[adapter_name] and base.bias is not None:
            base.bias.data = (base.bias.data / vector.flatten()).to(base.bias.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        self._mixed_stacks.clear()
        super().delete_adapter(adapter_name)
        self.is_feedforward.pop(adapter_name, None)
        self._weights_before_merge.pop(adapter_name, None)


def attach(model: nn.Module, config: IA3Config, adapter_name: str, **_: object) -> None:
    # peft's defaults: the keys, values and feed-forward output projection, the latter scaled at its input.
    key_values, ffn_outputs = role_patterns(model, "key_value"), role_patterns(model, "ffn_output")
    default_targets = suffix_regex((*key_values, *ffn_outputs)) if key_values else None
    default_feedforward = suffix_regex(ffn_outputs) if ffn_outputs else None
    if config.target_modules is None and default_targets is None:
        kind = model_type(model)
        raise ConfigError(
            f"IA3 has no default targets for {type(model).__name__} (model type {kind!r}); give target_modules "
            "(the key and value projections and the feed-forward output projection) and feedforward_modules."
        )
    if config.feedforward_modules is None:
        # Resolved for the layers only: the saved config keeps None, as peft's files do. A copy, not
        # replace(): the family's feed-forward default need not be among the user's own targets.
        config = copy.copy(config)
        config.feedforward_modules = default_feedforward
    inject_layers(model, config, adapter_name, lambda m: IA3Layer if is_linear_like(m) else None, default_targets)


def _written_out(model: Any, adapter_name: str, config: IA3Config) -> IA3Config:
    """Targets and feed-forward modules as the module names wrapped, so that peft (whose defaults
    differ) reads the file as trained."""
    config = written_out_targets(model, adapter_name, config)
    if config.feedforward_modules is None or isinstance(config.feedforward_modules, str):
        feedforward = model.adapter_module_names(
            adapter_name, where=lambda layer: isinstance(layer, IA3Layer) and layer.is_feedforward.get(adapter_name, False))
        config = config.replace(feedforward_modules=feedforward)
    return config


register_method(
    MethodInfo(
        name="ia3",
        config_class=IA3Config,
        attach=attach,
        kind="reparameterized",
        description="Learned per-channel scaling of keys, values and the feed-forward activation ((IA)³)",
        resolve_targets=_written_out,
        compare_defaults={"lr": 5e-3},
    )
)
