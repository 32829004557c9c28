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

Mixed batches (adapter_names=...): the layer's bottlenecks are stacked (widths zero-padded,
scaling folded into the up-projection, a last slot with a zero up-projection for rows without an
adapter) and every row runs its own through batched matmuls; the LayerNorm's weight and bias and
the nonlinearity are chosen per row too.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig, ConfigError
from ...hf_compat import linear_out_features, model_type, role_patterns, suffix_regex
from ...inject import inject_layers, is_linear_like
from ...layer import DeltaLayer, RowAdapters, adapter_dtype
from ...mixed_batch import SlotPlan, StackCache, per_row, rows_by_tokens, select_per_row
from ...registry import MethodInfo, register_method

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}

# The architecture roles (hf_compat's table) each placement wraps.
PLACEMENT_ROLES = {"houlsby": ("attention_output", "ffn_output"), "pfeiffer": ("ffn_output",), "parallel": ("ffn_block",)}


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
    return linear_out_features(last)




SlotFunctions = list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


@dataclass(frozen=True)
class _BottleneckStacks:
    """One layer's bottlenecks stacked for a mixed batch, slot k for its k-th adapter in the batch;
    the last slot's up-projection is zero, so rows without an adapter here get no change."""

    norms: SlotFunctions | None  # LayerNorm without affine (per distinct eps) or identity, per slot
    norm_weight: torch.Tensor | None  # (slots + 1, features): 1 for slots without a LayerNorm
    norm_bias: torch.Tensor | None  # (slots + 1, features): 0 for slots without a LayerNorm
    down_weight: torch.Tensor  # (slots + 1, width, features), widths zero-padded
    down_bias: torch.Tensor  # (slots + 1, width)
    activations: SlotFunctions  # the nonlinearity per slot
    up_weight: torch.Tensor  # (slots + 1, width, features): (scaling · up.weight)ᵀ
    up_bias: torch.Tensor  # (slots + 1, features): scaling · up.bias


def _slot_functions(slot_keys: list[Hashable], functions: dict[Hashable, Callable], device: torch.device) -> SlotFunctions:
    """(slot mask, function) per distinct key, in first-seen order."""
    masks = {key: torch.tensor([k == key for k in slot_keys], device=device) for key in dict.fromkeys(slot_keys)}
    return [(mask, functions[key]) for key, mask in masks.items()]


def _norm_functions(adapters: list[Bottleneck], device: torch.device) -> SlotFunctions:
    """LayerNorm without its affine part (applied per row after) for slots with one, identity for
    the others; the last slot (no adapter: its output is zeroed by the up-projection) as slot 0."""

    def normalise(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda h: F.layer_norm(h, h.shape[-1:], eps=eps)

    keys = [a.layer_norm.eps if isinstance(a.layer_norm, nn.LayerNorm) else None for a in adapters]
    keys.append(keys[0])
    functions = {key: (nn.Identity() if key is None else normalise(key)) for key in keys}
    return _slot_functions(keys, functions, device)


def _stack_bottlenecks(adapters: list[Bottleneck]) -> _BottleneckStacks:
    reference = adapters[0].down.weight
    slots, features = len(adapters) + 1, reference.shape[1]
    # Zero-padded units stay at act(0) = 0 for every listed nonlinearity, and their up-projection
    # columns are zero anyway.
    width = max(a.down.weight.shape[0] for a in adapters)
    down_weight = reference.new_zeros((slots, width, features))
    down_bias = reference.new_zeros((slots, width))
    up_weight = reference.new_zeros((slots, width, features))
    up_bias = reference.new_zeros((slots, features))
    for slot, adapter in enumerate(adapters):
        w = adapter.down.weight.shape[0]
        down_weight[slot, :w] = adapter.down.weight
        down_bias[slot, :w] = adapter.down.bias
        up_weight[slot, :w] = (adapter.up.weight * adapter.scaling).T
        up_bias[slot] = adapter.up.bias * adapter.scaling
    with_norm = [(slot, a.layer_norm) for slot, a in enumerate(adapters) if isinstance(a.layer_norm, nn.LayerNorm)]
    norm_weight = norm_bias = None
    if with_norm:
        norm_weight, norm_bias = reference.new_ones((slots, features)), reference.new_zeros((slots, features))
        for slot, norm in with_norm:
            norm_weight[slot], norm_bias[slot] = norm.weight, norm.bias
    activation_keys = [repr(a.act) for a in adapters]
    activation_keys.append(activation_keys[0])  # the last slot's output is zeroed: any will do
    return _BottleneckStacks(
        norms=_norm_functions(adapters, reference.device) if with_norm else None,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        down_weight=down_weight,
        down_bias=down_bias,
        activations=_slot_functions(activation_keys, {repr(a.act): a.act for a in adapters}, reference.device),
        up_weight=up_weight,
        up_bias=up_bias,
    )


def _bottlenecks_per_row(stacks: _BottleneckStacks, plan: SlotPlan, hidden: torch.Tensor) -> torch.Tensor:
    """Bottleneck.forward with each row's own adapter (zero for rows without one)."""
    h = rows_by_tokens(hidden).to(stacks.down_weight.dtype)
    if stacks.norms is not None:
        h = select_per_row(plan, stacks.norms, h)
        h = h * per_row(plan, stacks.norm_weight, h) + per_row(plan, stacks.norm_bias, h)
    down = torch.baddbmm(per_row(plan, stacks.down_bias, h), h, plan.gather(stacks.down_weight).transpose(1, 2))
    up = torch.baddbmm(per_row(plan, stacks.up_bias, h), select_per_row(plan, stacks.activations, down), plan.gather(stacks.up_weight))
    return up.view(hidden.shape).to(hidden.dtype)


class _BottleneckLayer(DeltaLayer):
    adapter_attributes = ("bottleneck",)
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bottleneck = nn.ModuleDict()
        self._mixed_stacks: StackCache[_BottleneckStacks] = StackCache()

    def add_adapter(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        self._mixed_stacks.clear()
        reference = next(self.get_base_layer().parameters())
        features = _output_features(self.base_layer, module_name)
        self.bottleneck[adapter_name] = Bottleneck(features, config, reference.device, adapter_dtype(reference))

    def delete_adapter(self, adapter_name: str) -> None:
        self._mixed_stacks.clear()
        super().delete_adapter(adapter_name)

    def _active(self) -> list[str]:
        return [n for n in self.active_unmerged() if n in self.bottleneck]

    def _row_adapters_output(self, rows: RowAdapters, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's adapter output for `hidden`, or None when no row's adapter is on this layer."""
        rows.check_batch(hidden, lambda: f"bottleneck adapter layer on {type(self.get_base_layer()).__name__}")
        found = self._mixed_stacks.get(rows, self.bottleneck.keys(), hidden.device, self._stack_key, self._build_stacks)
        return None if found is None else _bottlenecks_per_row(*found, hidden)

    def _stack_key(self, names: tuple[str, ...]) -> tuple[tuple, list[torch.Tensor]]:
        adapters = [self.bottleneck[n] for n in names]
        described = tuple((a.scaling, repr(a.act), repr(a.layer_norm)) for a in adapters)
        return described, [p for a in adapters for p in a.parameters()]

    def _build_stacks(self, names: tuple[str, ...]) -> _BottleneckStacks:
        return _stack_bottlenecks([self.bottleneck[n] for n in names])


class SequentialAdapterLayer(_BottleneckLayer):
    """h ← h + adapter(h) on the wrapped module's output (Houlsby and Pfeiffer placements)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            delta = self._row_adapters_output(self.row_adapters, result)
            return result if delta is None else result + delta
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
        if self.residual_inside:
            if args:
                residual, args = args[0], args[1:]
            else:
                residual = kwargs.pop("input_tensor")
            delta = self._adapter_output(residual)
            return self.base_layer(hidden_states, residual if delta is None else residual + delta, *args, **kwargs)
        delta = self._adapter_output(hidden_states)
        result = self.base_layer(hidden_states, *args, **kwargs)
        return result if delta is None else result + delta

    def _adapter_output(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """What the adapters add beside the block: each row's own in a mixed batch, else the sum
        of the active ones; None when there is nothing to add."""
        if self.row_adapters is not None:
            return self._row_adapters_output(self.row_adapters, hidden)
        active = self._active()
        return self._adapters_sum(active, hidden) if active else None


def placement_targets(model: nn.Module, placement: str) -> str:
    """A regex of the modules a placement wraps in this model's architecture."""
    fragments = [role_patterns(model, role) for role in PLACEMENT_ROLES[placement]]
    if not all(fragments):
        kind = model_type(model)
        where = "feed-forward blocks" if placement == "parallel" else "attention and feed-forward output projections"
        raise ConfigError(
            f"Bottleneck adapters do not know the {where} of {type(model).__name__} (model type {kind!r}); "
            f"give target_modules naming them for placement {placement!r}."
        )
    return suffix_regex(fragment for role in fragments for fragment in role)


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
        search_space=lambda trial: {"reduction_factor": trial.suggest_categorical("reduction_factor", [4, 8, 16, 32]),
                                    "placement": trial.suggest_categorical("placement", list(PLACEMENTS))},
    )
)

# AdapterFusion builds on the bottleneck layers above.
from . import fusion  # noqa: E402,F401  (registers "fusion")
