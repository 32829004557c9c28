"""Bottleneck adapters: down-projection, nonlinearity, up-projection and a residual connection.

    adapter(h) = scaling · up(act(down(LayerNorm?(h))))

The up-projection starts at zero, so the wrapped model starts exactly equal to the base.
Placements, realised by wrapping modules of the unmodified Hugging Face model:

* houlsby (Houlsby et al. 2019): after the attention output projection and after the
  feed-forward output projection, h ← h + adapter(h), before the block's residual add. Wraps
  Llama self_attn.o_proj + mlp.down_proj, GPT-2 attn.c_proj + mlp.c_proj, BERT
  attention.output.dense + layer.N.output.dense, ViT attention.o_proj + mlp.fc2 (transformers
  < 5: as BERT), T5 SelfAttention.o / EncDecAttention.o + DenseReluDense.wo.
* pfeiffer (Pfeiffer et al. 2021): the feed-forward one only.
* parallel (He et al. 2022): beside the feed-forward block, its input the block's input and its
  output added to the block's output: wraps Llama/GPT-2/ViT `mlp` and T5 `DenseReluDense`. BERT's
  feed-forward output module (layer.N.output) adds the residual and normalises inside, so there
  the adapter's output is added to that residual input, i.e. still to the FFN output before the
  LayerNorm.

Not mergeable: the nonlinearity keeps the adapter beside the weights.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..inject import inject_layers, is_linear_like, model_family
from ..layer import DeltaLayer, adapter_dtype
from ..registry import MethodInfo, register_method

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}

# Module-name regexes (suffixes at a dot boundary) per architecture family and insertion point.
ATTENTION_OUTPUT = {
    "llama": [r"self_attn\.o_proj"], "gpt2": [r"attn\.c_proj"], "bert": [r"attention\.output\.dense"],
    "vit": [r"attention\.o_proj", r"attention\.output\.dense"], "t5": [r"SelfAttention\.o", r"EncDecAttention\.o"],
}
FFN_OUTPUT = {
    "llama": [r"mlp\.down_proj"], "gpt2": [r"mlp\.c_proj"], "bert": [r"layer\.\d+\.output\.dense"],
    "vit": [r"mlp\.fc2", r"layer\.\d+\.output\.dense"], "t5": [r"DenseReluDense\.wo"],
}
FFN_BLOCK = {
    "llama": [r"mlp"], "gpt2": [r"mlp"], "bert": [r"layer\.\d+\.output"],
    "vit": [r"mlp", r"layer\.\d+\.output"], "t5": [r"DenseReluDense"],
}


@dataclass
class BottleneckConfig(AdapterConfig):
    """placement: "houlsby", "pfeiffer" or "parallel" (see the module docstring);
    reduction_factor: bottleneck width = hidden size // reduction_factor;
    nonlinearity: one of relu, gelu, silu (swish), tanh, identity;
    layer_norm: normalise the adapter's input with its own LayerNorm;
    scaling: multiplies the adapter's output (He et al. use 4 for parallel adapters);
    init_weights: True starts the up-projection at zero (output unchanged); False random (tests);
    target_modules: None for the placement's modules of the architecture, or the modules whose
    output (sequential placements) or side (parallel) the adapter should take."""

    method = "adapter"
    peft_type = "ADAPTER"

    placement: str = "houlsby"
    reduction_factor: int = 16
    nonlinearity: str = "relu"
    layer_norm: bool = False
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}.")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {self.nonlinearity!r}.")


class Bottleneck(nn.Module):
    """scaling · up(act(down(norm(h)))); the residual is added by the layer that calls it."""

    def __init__(self, features: int, config: BottleneckConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        width = max(1, features // config.reduction_factor)
        kwargs = {"device": device, "dtype": dtype}
        self.layer_norm = nn.LayerNorm(features, **kwargs) if config.layer_norm else nn.Identity()
        self.down = nn.Linear(features, width, **kwargs)
        self.act = NONLINEARITIES[config.nonlinearity]()
        self.up = nn.Linear(width, features, **kwargs)
        self.scaling = config.scaling
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            if config.init_weights:
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
            else:
                nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return (self.up(self.act(self.down(self.layer_norm(hidden.to(dtype))))) * self.scaling).to(hidden.dtype)


def _output_features(module: nn.Module, module_name: str) -> int:
    """The output width of a linear layer, or of the last linear layer inside a block."""
    if isinstance(module, DeltaLayer):
        module = module.get_base_layer()
    linears = [m for m in module.modules() if is_linear_like(m) and not isinstance(m, DeltaLayer)]
    if not linears:
        raise ConfigError(f"Module {module_name!r} ({type(module).__name__}) holds no linear layer, so its width is unknown; target a projection or a feed-forward block.")
    last = linears[-1]
    return last.weight.shape[1] if type(last).__name__ == "Conv1D" else last.weight.shape[0]




class _BottleneckLayer(DeltaLayer):
    adapter_attributes = ("bottleneck",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        reference = next(self.get_base_layer().parameters())
        features = _output_features(self.base_layer, module_name)
        self.bottleneck[adapter_name] = Bottleneck(features, config, reference.device, adapter_dtype(reference))

    def _active(self) -> list[str]:
        return [n for n in self.active_unmerged() if n in self.bottleneck]


class SequentialAdapterLayer(_BottleneckLayer):
    """h ← h + adapter(h) on the wrapped module's output (Houlsby and Pfeiffer placements)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(*args, **kwargs)
        for name in self._active():
            result = result + self.bottleneck[name](result)
        return result


class ParallelAdapterLayer(_BottleneckLayer):
    """block(h) + adapter(h): the adapter sees the block's input beside it (He et al.)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # BERT-style output modules take (hidden_states, input_tensor) and return
        # LayerNorm(dense(hidden_states) + input_tensor): input_tensor is the FFN block's input.
        self.residual_inside = "input_tensor" in inspect.signature(self.get_base_layer().forward).parameters

    def _adapters_sum(self, active: list[str], hidden: torch.Tensor) -> torch.Tensor:
        return sum(self.bottleneck[name](hidden) for name in active)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.residual_inside:
            if args:
                residual, args = args[0], args[1:]
            else:
                residual = kwargs.pop("input_tensor")
            return self.base_layer(hidden_states, residual + self._adapters_sum(active, residual), *args, **kwargs)
        return self.base_layer(hidden_states, *args, **kwargs) + self._adapters_sum(active, hidden_states)


def placement_targets(model: nn.Module, placement: str) -> str:
    """A regex of the modules a placement wraps in this model's architecture."""
    family = model_family(model)
    tables = {"houlsby": [ATTENTION_OUTPUT, FFN_OUTPUT], "pfeiffer": [FFN_OUTPUT], "parallel": [FFN_BLOCK]}[placement]
    if family not in tables[0]:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        where = "feed-forward blocks" if placement == "parallel" else "attention and feed-forward output projections"
        raise ConfigError(
            f"Bottleneck adapters do not know the {where} of {type(model).__name__} (model type {model_type!r}); "
            f"give target_modules naming them for placement {placement!r}."
        )
    fragments = [fragment for table in tables for fragment in table[family]]
    return rf"(?:.*\.)?(?:{'|'.join(fragments)})"


def attach(model: nn.Module, config: BottleneckConfig, adapter_name: str, **_: object) -> None:
    fallback = placement_targets(model, config.placement) if config.target_modules is None else None
    layer_class = ParallelAdapterLayer if config.placement == "parallel" else SequentialAdapterLayer
    inject_layers(model, config, adapter_name, layer_class, fallback)


register_method(
    MethodInfo(
        name="adapter",
        config_class=BottleneckConfig,
        attach=attach,
        kind="additive",
        description="Bottleneck adapters (Houlsby, Pfeiffer or parallel placement) with a residual connection",
        mergeable=False,
        compare_defaults={"placement": "houlsby", "reduction_factor": 16, "nonlinearity": "relu", "lr": 1e-3},
    )
)
