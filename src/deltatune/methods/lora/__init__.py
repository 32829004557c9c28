"""LoRA (Hu et al. 2021) and its variants: rsLoRA scaling, DoRA, PiSSA and gaussian init.

W x  becomes  W x + s · B A x  with A (r × in), B (out × r) and s = alpha / r (alpha / √r for
rsLoRA). DoRA (Liu et al. 2024) also learns a per-output magnitude m and uses
m · (W + s·BA) / ‖W + s·BA‖ with the norm treated as a constant in backward, as the paper and
peft do. Targets: nn.Linear, transformers' GPT-2 Conv1D (weight stored in × out), nn.Embedding
and nn.Conv2d.

Mixed batches (one adapter per row, `DeltaModel(..., adapter_names=[...])`) run on Linear and
Conv1D targets, DoRA included, in the way of Punica's and S-LoRA's batched kernels: the batch's
adapters are stacked once (ranks zero-padded, scaling folded into B, one all-zero slot for rows
without an adapter) and every row is served by batched matmuls, never a loop over rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig, ConfigError
from ...hf_compat import is_conv1d, is_quantized_linear
from ...inject import layer_attach
from ...kernels import LoraParams, lora_linear
from ...kernels.row_lora import kernel_applies as row_lora_kernel_applies
from ...kernels.row_lora import SharedShrink, kernel_rank, linear_plus_row_lora, row_lora_add_, shrink_for_siblings
from ...layer import DeltaLayer, RowAdapters, adapter_dtype, autocast_enabled
from ...mixed_batch import SlotPlan, StackCache, needs_autograd, rows_by_tokens
from ...model import written_out_targets
from ...registry import MethodInfo, register_method

INIT_CHOICES = (True, False, "gaussian", "pissa")


@dataclass
class LoraConfig(AdapterConfig):
    """r: rank; lora_alpha: scale numerator; use_rslora: alpha/√r instead of alpha/r;
    use_dora: learn a magnitude vector (Linear and Conv1D targets);
    init_lora_weights: True (B = 0, output unchanged at start), "gaussian", "pissa" (A, B from
    the top-r singular vectors of W, W keeps the residual), or False (random, for tests);
    rank_pattern / alpha_pattern: {module-name regex: value} overriding r / lora_alpha;
    bias: only "none" is supported (train biases with the bitfit method in a hybrid)."""

    method = "lora"
    peft_type = "LORA"
    # peft writes these always; they only matter when a flag we refuse (use_qalora...) is on.
    tolerated_foreign_fields = AdapterConfig.tolerated_foreign_fields | {"qalora_group_size"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ConfigError(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}.")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; use 'none' and add the bitfit method for biases.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ConfigError(f"rank_pattern ranks must be positive integers, got {bad}.")
        bad = {k: v for k, v in self.alpha_pattern.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
        if bad:
            raise ConfigError(f"alpha_pattern values must be finite numbers, got {bad}.")
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                try:
                    re.compile(key)
                except (re.error, TypeError) as err:
                    raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression ({err}).") from None

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return _pattern_value(self.rank_pattern, module_name, self.r), _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: dict, module_name: str, default):
    # peft's rule: the key must match the end of the module name at a dot boundary.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default




# A mixed batch's LoRA product takes one of two forms per call (both are exact):
# gathered (BGMV-like): each row gathers its adapter's A and B and two bmm's run; the weights are
#   copied once per row, the compute is one adapter's per token;
# masked: every row runs through all K adapters' A at once (one matmul), the columns of other
#   adapters are zeroed, one matmul through all B's; the weights are read once, the compute is
#   K adapters' per token.
# Decoding (a token per row) is bound by reading weights, so the masked form wins there, as it
# does for a single adapter (no excess compute); rows of many tokens (prefill) over several
# adapters would pay K times the compute, so they gather.
# The masked form runs while tokens per row × (adapters in the layer − 1) is at most this, per
# device type. CPU: the measured crossover (r=16, 256 -> 688, one core). GPUs: compute is cheap next
# to the copies a gather makes and its extra kernel launches, so the masked form goes further.
MASKED_MAX_EXCESS = {"cpu": 6, "cuda": 64}
MASKED_MAX_EXCESS_DEFAULT = 64


@dataclass(frozen=True)
class _LoraStacks:
    """One layer's LoRA adapters stacked for a mixed batch; the last slot is all zeros."""

    down: torch.Tensor  # (slots + 1, r_max, in): A, ranks zero-padded
    up: torch.Tensor  # (slots + 1, r_max, out): (scaling · B)ᵀ, ranks zero-padded
    dora_scale: torch.Tensor | None  # (slots + 1, out): m / ‖W + s·BA‖ for DoRA adapters, 1 elsewhere


def _bypassable_linear(base: nn.Module) -> bool:
    """Whether `base` is a plain nn.Linear whose matmul a LoRA layer may run itself: no hooks
    (accelerate's offloading, a user's) and no replaced forward that calling it would skip."""
    return (type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
            and "forward" not in base.__dict__)


def _masked_form_pays(tokens_per_row: int, adapters: int, device: torch.device) -> bool:
    excess = tokens_per_row * (adapters - 1)  # adapters' products computed per token beyond the row's own
    return excess <= MASKED_MAX_EXCESS.get(device.type, MASKED_MAX_EXCESS_DEFAULT)


def _gathered_lora(x_rows: torch.Tensor, stacks: _LoraStacks, plan: SlotPlan) -> torch.Tensor:
    down = plan.gather(stacks.down)  # (batch, r_max, in)
    hidden = torch.bmm(x_rows, down.transpose(1, 2))
    return torch.bmm(hidden, plan.gather(stacks.up))


def _masked_hidden(x_rows: torch.Tensor, stacks: _LoraStacks, plan: SlotPlan) -> torch.Tensor:
    """(batch, tokens, slots · r): every adapter's x·Aᵀ, zero outside each row's own adapter."""
    slots, rank = len(plan.names), stacks.down.shape[1]
    hidden = F.linear(x_rows, stacks.down[:slots].reshape(slots * rank, -1)).unflatten(-1, (slots, rank))
    # Rows keep their own adapter's rank columns; rows without an adapter here keep none.
    return (hidden * plan.one_hot(hidden.dtype)[:, None, :, None]).flatten(-2)


def _masked_lora(x_rows: torch.Tensor, stacks: _LoraStacks, plan: SlotPlan) -> torch.Tensor:
    slots = len(plan.names)
    return _masked_hidden(x_rows, stacks, plan) @ stacks.up[:slots].flatten(0, 1)


def _add_lora_in_place(result_rows: torch.Tensor, x_rows: torch.Tensor, stacks: _LoraStacks, plan: SlotPlan, masked: bool) -> None:
    """result_rows += the rows' products, the add folded into the second matmul (one pass over the
    output instead of a product tensor and a sum). Inference only: it writes into the base output."""
    if masked:
        hidden = _masked_hidden(x_rows, stacks, plan)
        result_rows.view(-1, result_rows.shape[-1]).addmm_(hidden.flatten(0, 1), stacks.up[: len(plan.names)].flatten(0, 1))
    else:
        hidden = torch.bmm(x_rows, plan.gather(stacks.down).transpose(1, 2))
        result_rows.baddbmm_(hidden, plan.gather(stacks.up))


def _shrink_for_siblings(layers: Sequence[DeltaLayer], rows: RowAdapters, x_rows: torch.Tensor,
                         plan: SlotPlan) -> list[SharedShrink] | None:
    """One shared shrink for sibling LoRA layers whose rows take the same slots (same adapters
    held) in plain LoRA (no DoRA); None if any sibling differs."""
    downs = []
    for layer in layers:
        if not isinstance(layer, LoraLinear) or layer.row_adapters is not rows:
            return None
        found = layer._mixed_stacks.get(rows, layer.lora_A.keys(), x_rows.device, layer._stack_key, layer._build_stacks)
        if found is None or found[0].dora_scale is not None or found[1].row_slot is not plan.row_slot:
            return None
        downs.append(found[0].down)
    return shrink_for_siblings(x_rows.reshape(-1, x_rows.shape[-1]), downs, plan.row_slot, len(plan.names))


class _LoraBase(DeltaLayer):
    """Per-adapter scaling and dropout shared by every LoRA layer type."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}

    def _register_common(self, adapter_name: str, config: LoraConfig, module_name: str) -> int:
        rank, alpha = config.rank_and_alpha(module_name)
        self.rank[adapter_name] = rank
        self.scaling[adapter_name] = config.scaling(rank, alpha)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if config.use_dora and not isinstance(self, LoraLinear):
            raise ConfigError(f"DoRA is supported on Linear and Conv1D targets; {module_name!r} is a {type(self.get_base_layer()).__name__}.")
        return rank

    def graph_key(self) -> tuple | None:
        # forward reads the adapters' tensors, the active/merged/disabled state and the scalings
        key = self._plain_graph_key()
        return None if key is None else (*key, tuple(sorted(self.scaling.items())))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        self.scaling.pop(adapter_name, None)
        self.rank.pop(adapter_name, None)


class LoraLinear(_LoraBase):
    """LoRA on nn.Linear and on GPT-2's Conv1D (whose weight is stored transposed)."""

    adapter_attributes = ("lora_A", "lora_B", "lora_magnitude_vector")
    supports_mixed_batch = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base)
        if is_quantized_linear(base):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = (base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_norm_at_merge: dict[str, torch.Tensor] = {}
        # The base weight as it was before each PiSSA init rewrote it (a host copy), in the order of
        # the inits: deleting the adapter puts those exact bits back, so a shared base is left as found.
        self._base_before_pissa: dict[str, torch.Tensor] = {}
        self._fast_path_key: tuple | None = None
        self._fast_path: tuple | None = None
        self._mixed_stacks: StackCache[_LoraStacks] = StackCache()

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) whatever its storage."""
        if is_quantized_linear(self.get_base_layer()):
            return self.get_base_layer().dequantized_weight()
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def _add_lora(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        rank = self._register_common(adapter_name, config, module_name)
        weight = self.base_weight()
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False, **kwargs)
        self.lora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False, **kwargs)
        self._init_weights(adapter_name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                norm = self._combined_weight(adapter_name).norm(p=2, dim=1)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(kwargs["dtype"]))

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init == "pissa":
                self._pissa_init(adapter_name)
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.rank[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)

    def _pissa_init(self, adapter_name: str) -> None:
        """A, B from the top-r singular triplets of W; the base keeps W − s·BA (the residual)."""
        rank, scaling = self.rank[adapter_name], self.scaling[adapter_name]
        self._refuse_quantized_base("PiSSA init (which rewrites the base weight)")
        stored = self.get_base_layer().weight
        weight = self.base_weight().float()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[:rank] / scaling)
        A = root[:, None] * Vh[:rank]
        B = U[:, :rank] * root[None, :]
        self.lora_A[adapter_name].weight.copy_(A)
        self.lora_B[adapter_name].weight.copy_(B)
        residual = weight - scaling * (B @ A)
        self._base_before_pissa[adapter_name] = stored.detach().to("cpu", copy=True)
        stored.data.copy_((residual.T if self.fan_in_fan_out else residual).to(stored.dtype))

    def _lora_product(self, adapter_name: str) -> torch.Tensor:
        return self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight

    def _combined_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_weight()
        return weight.to(self.lora_A[adapter_name].weight.dtype) + self.scaling[adapter_name] * self._lora_product(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.scaling[adapter_name] * self._lora_product(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def _refuse_quantized_base(self, what: str) -> None:
        if is_quantized_linear(self.get_base_layer()):
            raise TypeError(
                f"{what} needs a full-precision base weight, but this layer's base is quantized. Merge with "
                f"deltatune.quant.merge_quantized(model, mode='dequantize' or 'requantize', sample_inputs=...)."
            )

    def merge_adapter(self, adapter_name: str) -> None:
        self._refuse_quantized_base("Merging")
        self._mixed_stacks.clear()  # DoRA stacks depend on the base weight, written through .data
        if adapter_name not in self.lora_magnitude_vector:
            return super().merge_adapter(adapter_name)
        stored = self.get_base_layer().weight
        combined = self._combined_weight(adapter_name)
        norm = combined.norm(p=2, dim=1)
        self._dora_norm_at_merge[adapter_name] = norm
        merged = (self.lora_magnitude_vector[adapter_name] / norm)[:, None] * combined
        stored.data.copy_((merged.T if self.fan_in_fan_out else merged).to(stored.dtype))

    def unmerge_adapter(self, adapter_name: str) -> None:
        self._mixed_stacks.clear()
        if adapter_name not in self.lora_magnitude_vector:
            return super().unmerge_adapter(adapter_name)
        stored = self.get_base_layer().weight
        norm = self._dora_norm_at_merge.pop(adapter_name)
        merged = self.base_weight().to(norm.dtype)
        original = merged * (norm / self.lora_magnitude_vector[adapter_name])[:, None] - self.scaling[adapter_name] * self._lora_product(adapter_name)
        stored.data.copy_((original.T if self.fan_in_fan_out else original).to(stored.dtype))

    # -- the fused path (deltatune.kernels.lora_linear) --------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        self._fast_path_key = None
        self._mixed_stacks.clear()
        self._add_lora(adapter_name, config, module_name)

    def delete_refusal(self, adapter_name: str) -> str | None:
        inits = list(self._base_before_pissa)
        if adapter_name in inits and inits[-1] != adapter_name:
            # A later PiSSA init took its residual from this one's: only the reverse order restores exactly.
            return (f"PiSSA adapters rewrote this base weight in turn ({', '.join(inits)}); "
                    f"delete {inits[-1]!r} before {adapter_name!r}.")
        return super().delete_refusal(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._fast_path_key = None
        self._mixed_stacks.clear()
        super().delete_adapter(adapter_name)
        if adapter_name in self._base_before_pissa:
            stored = self.get_base_layer().weight
            with torch.no_grad():
                stored.copy_(self._base_before_pissa.pop(adapter_name).to(stored.device))

    def lora_fast_path_params(self) -> LoraParams | None:
        """The fused kernels' view of this layer when one plain LoRA adapter runs on an nn.Linear, else None.

        The training step is host-bound on a GPU, so the answer is cached and recomputed only
        when what it depends on changes.
        """
        base = self.base_layer  # a wrapper of another method inside must run its own forward
        # In a mixed batch each row has its own adapter: the fused MLP must call forward instead.
        if self.row_adapters is not None or not _bypassable_linear(base) or autocast_enabled():
            return None
        # Outer wrappers (Fisher, LayerNorm tuning) may swap the weight tensor per call.
        # ...and the adapter's tensors may be stand-ins for a while (kernels/block_graphs.py)
        adapters = tuple((id(self.lora_A[n].weight), id(self.lora_B[n].weight)) for n in self.active_adapters if n in self.lora_A)
        key = (tuple(self.active_adapters), tuple(self.merged_adapters), self.disabled, base.weight.requires_grad, id(base.weight),
               id(base.bias), adapters)
        if key != self._fast_path_key:
            self._fast_path_key, self._fast_path = key, self._compute_fast_path(base)
        return self._fast_path

    def _compute_fast_path(self, base: nn.Linear) -> LoraParams | None:
        name = self._single_plain_adapter()
        if name is None or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        return LoraParams(base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                          self._dropout_p(name))

    def _single_plain_adapter(self) -> str | None:
        """The name of the one active unmerged adapter where it is plain LoRA (not DoRA), else None."""
        active = self.active_unmerged()
        if len(active) != 1 or active[0] not in self.lora_A or active[0] in self.lora_magnitude_vector:
            return None
        return active[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(self.row_adapters, x, *args, **kwargs)
        params = None if args or kwargs else self.lora_fast_path_params()
        if params is not None and x.dtype == params.weight.dtype:
            # One autograd node: saves x and the rank-wide x·A only, dropout recomputed from a seed.
            return lora_linear(x, *params, training=self.training)
        fused = None if args or kwargs else self._quantized_base_forward(x)
        if fused is not None:
            return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_unmerged():
            if name not in self.lora_A:
                continue
            A = self.lora_A[name]
            x_lora = self.lora_dropout[name](x.to(A.weight.dtype))
            lora_out = self.lora_B[name](A(x_lora)) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                lora_out = self._dora_output(name, x_lora, result, lora_out)
            result = result + lora_out.to(result.dtype)
        return result

    def _quantized_base_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One plain adapter over a 4-bit base as a single autograd node (the base's lora_forward),
        which dequantizes again in backward instead of saving the dequantized weight; None where
        the composed path must run. On an H100 this takes QLoRA from 1.1-1.3x to ~1.5x peft's
        tokens/s (benchmarks/qlora_throughput.py)."""
        name = self._single_adapter_over_4bit()
        if name is None:
            return None
        dropout_p = self._dropout_p(name)
        return self.base_layer.lora_forward(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                                            dropout_p, self.training)

    def lora_mlp_params(self) -> LoraParams | None:
        """This layer's view for the one-node LoRA MLP (kernels.lora_mlp): lora_fast_path_params
        over an nn.Linear, or over a 4-bit base the same with the base layer standing in for its
        weight (the MLP node asks it for x·Wᵀ and g·W, dequantizing per use); else None."""
        params = self.lora_fast_path_params()
        name = None if params is not None or self.row_adapters is not None else self._single_adapter_over_4bit()
        if name is None:
            return params
        base = self.base_layer
        return LoraParams(base, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                          self._dropout_p(name))

    def _single_adapter_over_4bit(self) -> str | None:
        """The one active plain adapter where the base is 4-bit (has lora_forward), else None."""
        return self._single_plain_adapter() if hasattr(self.base_layer, "lora_forward") else None

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def _dora_output(self, name: str, x_lora: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """The extra output of DoRA beyond the base layer's: (m/‖W'‖ − 1)·Wx + m/‖W'‖·s·BAx."""
        norm = self._combined_weight(name).norm(p=2, dim=1).detach()
        scale = self.lora_magnitude_vector[name] / norm
        if isinstance(self.lora_dropout[name], nn.Identity):
            base_out = result.to(scale.dtype)
            if self.bias is not None:
                base_out = base_out - self.bias.to(scale.dtype)
        else:
            base_out = F.linear(x_lora, self.base_weight().to(scale.dtype))
        return (scale - 1) * base_out + scale * lora_out

    # -- mixed batches: one adapter per row ------------------------------------------------
    def _mixed_forward(self, rows: RowAdapters, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows.check_batch(x, lambda: f"LoRA layer {type(self.get_base_layer()).__name__}({self.in_features} -> {self.out_features})")
        found = self._mixed_stacks.get(rows, self.lora_A.keys(), x.device, self._stack_key, self._build_stacks)
        if found is None:  # no row's adapter is on this layer
            return self.base_layer(x, *args, **kwargs)
        stacks, plan = found
        self._refuse_row_dropout(plan.names)
        x_rows = rows_by_tokens(x).to(stacks.down.dtype)
        masked = _masked_form_pays(x_rows.shape[1], len(plan.names), x.device)
        shrunk = self._sibling_shrink(rows, x, x_rows, stacks, plan)
        weight = None if args or kwargs else self._plain_linear_weight(x, stacks)
        if weight is not None:
            product = _masked_lora if masked else _gathered_lora
            out = linear_plus_row_lora(x_rows, weight, stacks.down, stacks.up, plan.row_slot, len(plan.names),
                                       lambda: product(x_rows, stacks, plan), shrunk)
            return out.view(*x.shape[:-1], out.shape[-1])
        result = self.base_layer(x, *args, **kwargs)
        result_rows = rows_by_tokens(result)
        if stacks.dora_scale is None and row_lora_kernel_applies(result_rows, x_rows, stacks.down, stacks.up):
            # Captured into a CUDA graph: Triton kernels add every row's product into the base output.
            added = row_lora_add_(result_rows, x_rows, stacks.down, stacks.up, plan.row_slot, len(plan.names), shrunk)
            return added.view(result.shape)
        if (stacks.dora_scale is None and result.dtype == stacks.down.dtype and result_rows.is_contiguous()
                and not needs_autograd([x, result, stacks.down, stacks.up])):
            _add_lora_in_place(result_rows, x_rows, stacks, plan, masked)
            return result
        lora_out = (_masked_lora if masked else _gathered_lora)(x_rows, stacks, plan)
        if stacks.dora_scale is not None:
            lora_out = self._mixed_dora_output(stacks, plan, rows_by_tokens(result), lora_out)
        return result + lora_out.view(result.shape).to(result.dtype)

    def _sibling_shrink(self, rows: RowAdapters, x: torch.Tensor, x_rows: torch.Tensor, stacks: _LoraStacks,
                        plan: SlotPlan) -> SharedShrink | None:
        """This layer's x·Aᵀ from one shrink launch for every sibling reading the same x (q/k/v,
        gate/up) in a captured decode step; None where each layer runs its own kernels."""
        group = self.input_group
        if (group is None or stacks.dora_scale is not None or x_rows.shape[1] != 1 or not x_rows.is_cuda
                or not torch.cuda.is_current_stream_capturing()):
            return None
        return group.part(self, x, lambda: _shrink_for_siblings(group.layers, rows, x_rows, plan))

    def _plain_linear_weight(self, x: torch.Tensor, stacks: _LoraStacks) -> torch.Tensor | None:
        """The base weight where the base is a plain bias-free nn.Linear at inference whose matmul
        linear_plus_row_lora may run itself; else None."""
        base = self.base_layer
        if not _bypassable_linear(base) or base.bias is not None or stacks.dora_scale is not None:
            return None
        weight = base.weight
        if not (x.dtype == weight.dtype == stacks.down.dtype) or needs_autograd([x, weight, stacks.down, stacks.up]):
            return None
        return weight

    def _refuse_row_dropout(self, names: tuple[str, ...]) -> None:
        # Dropout only acts in training, and mixed batches serve inference: rather than dropping
        # per row at each row's own rate, training with dropout is refused.
        if not self.training:
            return
        dropping = [n for n in names if isinstance(self.lora_dropout[n], nn.Dropout) and self.lora_dropout[n].training]
        if dropping:
            raise RuntimeError(
                f"Adapters {dropping} use lora_dropout, which mixed batches (adapter_names=...) do not apply per row. "
                f"Call model.eval() to serve several adapters in one batch, or train them one at a time with set_adapter()."
            )

    def _stack_key(self, names: tuple[str, ...]) -> tuple[tuple, list[torch.Tensor]]:
        """What the stacks of `names` are made of: scalings, and the tensors they read."""
        tensors = [t for n in names for t in (self.lora_A[n].weight, self.lora_B[n].weight)]
        dora = [self.lora_magnitude_vector[n] for n in names if n in self.lora_magnitude_vector]
        if dora:  # DoRA's norm reads the base weight too
            base = self.get_base_layer()
            tensors += dora + [*base.parameters(recurse=False), *base.buffers(recurse=False)]
        return tuple(self.scaling[n] for n in names), tensors

    def _build_stacks(self, names: tuple[str, ...]) -> _LoraStacks:
        pairs = [(self.lora_A[n].weight, self.lora_B[n].weight * self.scaling[n]) for n in names]
        dtype = reduce(torch.promote_types, [A.dtype for A, _ in pairs])
        rank = kernel_rank(max(A.shape[0] for A, _ in pairs), pairs[0][0].device)
        down = pairs[0][0].new_zeros((len(names) + 1, rank, self.in_features), dtype=dtype)
        up = pairs[0][0].new_zeros((len(names) + 1, rank, self.out_features), dtype=dtype)
        for slot, (A, scaled_B) in enumerate(pairs):
            down[slot, : A.shape[0]] = A
            up[slot, : A.shape[0]] = scaled_B.T
        return _LoraStacks(down, up, self._dora_scale_stack(names, down))

    def _dora_scale_stack(self, names: tuple[str, ...], like: torch.Tensor) -> torch.Tensor | None:
        dora = [(slot, n) for slot, n in enumerate(names) if n in self.lora_magnitude_vector]
        if not dora:
            return None
        scale = like.new_ones((len(names) + 1, self.out_features))
        for slot, name in dora:
            with torch.no_grad():  # the norm is a constant in backward, as in _dora_output
                norm = self._combined_weight(name).norm(p=2, dim=1)
            scale[slot] = self.lora_magnitude_vector[name] / norm
        return scale

    def _mixed_dora_output(self, stacks: _LoraStacks, plan: SlotPlan, result_rows: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
        """_dora_output per row: (f − 1)·(Wx) + f·s·BAx with f = m/‖W'‖ per row (1 for plain LoRA rows,
        which leaves their lora_out as it is; 1 for rows without an adapter, whose lora_out is 0)."""
        scale = plan.gather(stacks.dora_scale).unsqueeze(1)
        base_out = result_rows.to(scale.dtype)
        if self.bias is not None:
            base_out = base_out - self.bias.to(scale.dtype)
        return (scale - 1) * base_out + scale * lora_out


class LoraEmbedding(_LoraBase):
    """LoRA on nn.Embedding: a low-rank table A (r × vocab) looked up, then projected by B."""

    adapter_attributes = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        rank = self._register_common(adapter_name, config, module_name)
        if config.init_lora_weights == "pissa":
            raise ConfigError(f"PiSSA init is for Linear targets; {module_name!r} is an Embedding.")
        weight = self.get_base_layer().weight
        kwargs = {"device": weight.device, "dtype": adapter_dtype(weight)}
        A = torch.zeros(rank, weight.shape[0], **kwargs)
        B = torch.empty(weight.shape[1], rank, **kwargs)
        # peft's embedding init: A = 0, B ~ N(0, 1), so the output starts unchanged.
        nn.init.normal_(B)
        if config.init_lora_weights is False:
            nn.init.normal_(A)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]).T * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        for name in self.active_unmerged():
            if name not in self.lora_embedding_A:
                continue
            rows = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            result = result + ((rows @ self.lora_embedding_B[name].T) * self.scaling[name]).to(result.dtype)
        return result


class LoraConv2d(_LoraBase):
    """LoRA on nn.Conv2d: A is a conv with the base's kernel into r channels, B a 1×1 conv."""

    adapter_attributes = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        rank = self._register_common(adapter_name, config, module_name)
        base = self.get_base_layer()
        if base.groups != 1 or config.init_lora_weights == "pissa":
            raise ConfigError(f"LoRA on Conv2d {module_name!r} needs groups=1 and a non-PiSSA init.")
        kwargs = {"device": base.weight.device, "dtype": adapter_dtype(base.weight)}
        self.lora_A[adapter_name] = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **kwargs)
        self.lora_B[adapter_name] = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, **kwargs)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            if config.init_lora_weights is False:
                nn.init.kaiming_uniform_(self.lora_B[adapter_name].weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B[adapter_name].weight)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        # Composing the r-channel conv with the 1×1 conv is one conv whose kernel is B·A per tap.
        return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_unmerged():
            if name not in self.lora_A:
                continue
            A = self.lora_A[name]
            out = self.lora_B[name](A(self.lora_dropout[name](x.to(A.weight.dtype)))) * self.scaling[name]
            result = result + out.to(result.dtype)
        return result


def lora_layer_for(module: nn.Module) -> type[DeltaLayer] | None:
    if isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    return None


attach_lora = layer_attach(lora_layer_for)

def _lora_space(trial: Any) -> dict[str, Any]:
    # alpha as a multiple of r keeps the scale comparable across ranks; rsLoRA (alpha / sqrt r)
    # is what keeps high ranks learning.
    r = trial.suggest_categorical("r", [2, 4, 8, 16, 32])
    return {"r": r, "lora_alpha": r * trial.suggest_categorical("alpha_over_r", [1, 2, 4]),
            "use_rslora": trial.suggest_categorical("use_rslora", [False, True]),
            "lora_dropout": trial.suggest_float("lora_dropout", 0.0, 0.2)}


# Weighted combination builds on the classes above (QLoRA, at the end, on LoRA's registration).
from .combine import add_weighted_adapter  # noqa: E402

register_method(
    MethodInfo(
        name="lora",
        config_class=LoraConfig,
        attach=attach_lora,
        kind="reparameterized",
        description="Low-rank update B·A beside each target weight (rsLoRA, DoRA, PiSSA options)",
        # On a GPU the step is bound by host overhead and memory traffic: fused RMSNorm, rotary and
        # a one-node LoRA MLP pay off (the wrapper's fused="auto"; same function, tests/test_kernels.py).
        fused_kernels=True,
        # B·A of row-sharded B and A (DTensors) is row-sharded like W: each rank adds its rows; DoRA's
        # norms are per row too. Same weights and outputs as one process (tests/test_distributed.py).
        merges_sharded=True,
        combine=add_weighted_adapter,
        resolve_targets=written_out_targets,
        # Rank matters less than the rate (Hu et al.); rsLoRA's scaling from rank 64 up is outside this range.
        search_space=lambda trial: _lora_space(trial),
        # Rank 4 on every encoder linear keeps LoRA under 1% of MiniLM's parameters (rank 8: 1.4%),
        # at alpha / r = 2; QLoRA trains the same adapter over a 4-bit base.
        compare_defaults={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lr": 1e-3},
    )
)

from . import qlora  # noqa: E402,F401  (registers "qlora")
