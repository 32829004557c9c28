"""Sparse fine-tuning by Fisher information (after Sung et al. 2021, "FISH mask").

Before training, the diagonal empirical Fisher of each targeted weight entry is estimated on
`fisher_batches` batches of the user's data (the mean over batches of the squared gradient of
the loss), and the top `density` fraction (or `num_params` count) of entries over all targets is
kept. Only those entries train: each layer holds the kept entries' flat indices (a buffer) and
their deltas (a parameter), so gradients and optimizer state exist for the kept entries alone.
On a plain Linear or GPT-2 Conv1D, one autograd function computes x·(W + scatter(delta))ᵀ and
saves only x, rebuilding the dense sum in backward, so no dense copy of W is kept per layer
between forward and backward; other modules (or another method's wrapper inside) run their own
code with W + scatter(delta) swapped in. Files store indices + values.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_conv1d
from ..inject import find_targets, set_submodule
from ..io import KEY_PREFIX, AdapterFileError
from ..layer import DeltaLayer, adapter_dtype, autocast_enabled
from ..registry import MethodInfo, register_method

DEFAULT_DENSITY = 0.005
_INDICES_SUFFIX = ".sparse_delta.indices"


@dataclass
class FisherConfig(AdapterConfig):
    """fisher_batches: batches of calibration data used to estimate the Fisher information;
    density: the fraction of the targeted weights' entries to train (0.005 when neither it nor
    num_params is given); num_params: an exact count of entries instead;
    target_modules: None for the architecture's linear layers (their weights, not biases)."""

    method = "fisher"
    peft_type = "FISHER"

    fisher_batches: int = 8
    density: float | None = None
    num_params: int | None = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.fisher_batches, int) or self.fisher_batches <= 0:
            raise ConfigError(f"fisher_batches must be a positive integer, got {self.fisher_batches!r}.")
        if self.density is not None and self.num_params is not None:
            raise ConfigError("Give density (a fraction) or num_params (a count), not both.")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}; e.g. 0.005 trains 0.5% of the targeted weights.")
        if self.num_params is not None and (not isinstance(self.num_params, int) or self.num_params <= 0):
            raise ConfigError(f"num_params must be a positive integer, got {self.num_params!r}.")

    def budget(self, total: int) -> int:
        """How many of `total` entries to keep."""
        if self.num_params is not None:
            if self.num_params > total:
                raise ConfigError(f"num_params={self.num_params} exceeds the {total} entries of the targeted weights; lower it.")
            return self.num_params
        density = DEFAULT_DENSITY if self.density is None else self.density
        kept = round(density * total)
        if kept == 0:
            raise ConfigError(f"density={density} keeps no entry of the {total} targeted weights; raise it or give num_params.")
        return kept


class SparseDelta(nn.Module):
    """The trainable deltas of some entries of one weight, at flat (row-major) `indices`."""

    def __init__(self, indices: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=indices.device))




class _SparseDeltaLinear(torch.autograd.Function):
    """x·(W + Δ)ᵀ + b for a frozen W and Δ = `values` at flat `indices`, saving x but not W + Δ."""

    @staticmethod
    def forward(ctx, x, weight, bias, indices, values, transposed: bool):
        ctx.save_for_backward(x, weight, indices, values)
        ctx.transposed = transposed
        return F.linear(x, _combined(weight, indices, values, transposed), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices, values = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _combined(weight, indices, values, ctx.transposed)
        if ctx.needs_input_grad[4]:
            # The dense weight gradient exists only here, one layer at a time; only the kept entries leave.
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            if ctx.transposed:
                grad_weight = grad_weight.T
            grad_values = grad_weight.reshape(-1)[indices].to(values.dtype)
        return grad_x, None, None, None, grad_values, None


def _combined(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, transposed: bool) -> torch.Tensor:
    """W + Δ as (out, in); GPT-2's Conv1D stores W as (in, out)."""
    combined = weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view(weight.shape)
    return combined.T if transposed else combined


def _can_fuse(module: nn.Module) -> bool:
    """A plain, frozen Linear or Conv1D outside autocast: _SparseDeltaLinear computes it."""
    if not (type(module) is nn.Linear or is_conv1d(module)) or autocast_enabled():
        return False
    return not any(p.requires_grad for p in module.parameters(recurse=False))


class SparseDeltaLayer(DeltaLayer):
    """A layer whose weight trains at a fixed set of entries only."""

    adapter_attributes = ("sparse_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.sparse_delta = nn.ModuleDict()
        # The kept entries' values before each merge, so unmerge restores them exactly.
        self._before_merge: dict[str, torch.Tensor] = {}

    def add_adapter(self, adapter_name: str, config: FisherConfig, module_name: str, indices: torch.Tensor | None = None) -> None:
        if indices is None:
            raise ValueError("A Fisher-sparse layer is built from the entries the Fisher mask kept; add it with dt.wrap(..., calibration_data=...).")
        weight = self.weight
        self.sparse_delta[adapter_name] = SparseDelta(indices.to(weight.device), adapter_dtype(weight))

    def forward(self, *args, **kwargs):
        active = [n for n in self.active_unmerged() if n in self.sparse_delta]
        if not active:
            return self.base_layer(*args, **kwargs)
        base = self.base_layer
        if len(active) == 1 and len(args) == 1 and not kwargs and _can_fuse(base):
            delta = self.sparse_delta[active[0]]
            transposed = is_conv1d(base)
            return _SparseDeltaLinear.apply(args[0], base.weight, base.bias, delta.indices, delta.values, transposed)
        weight = self.weight
        flat = weight.reshape(-1)
        for name in active:
            delta = self.sparse_delta[name]
            flat = flat.index_add(0, delta.indices, delta.values.to(weight.dtype))
        return functional_call(self.base_layer, {self.inner_prefix() + "weight": flat.view(weight.shape)}, tuple(args), kwargs)

    def merge_adapter(self, adapter_name: str) -> None:
        delta = self.sparse_delta[adapter_name]
        flat = self.weight.data.view(-1)
        self._before_merge[adapter_name] = flat[delta.indices].clone()
        flat.index_add_(0, delta.indices, delta.values.detach().to(flat.dtype))

    def unmerge_adapter(self, adapter_name: str) -> None:
        delta = self.sparse_delta[adapter_name]
        self.weight.data.view(-1).index_copy_(0, delta.indices.long(), self._before_merge.pop(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._before_merge.pop(adapter_name, None)


# -- building the mask ---------------------------------------------------------------------------
def _batch_loss(model: nn.Module, batch: object, device: torch.device) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibration_data must yield dicts of tensors such as {{'input_ids': ..., 'labels': ...}}, got {type(batch).__name__}."
        )
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    output = model(**inputs)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss for a calibration batch; include labels in each batch "
            "(e.g. {'input_ids': ..., 'labels': ...}) so the Fisher information can be estimated."
        )
    return loss


def estimate_fisher(model: nn.Module, weights: list[torch.Tensor], batches: Iterable, num_batches: int) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: the mean over batches of each weight entry's squared gradient.

    Dropout is off while it runs, and every requires_grad flag is restored afterwards.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    scores = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    seen = 0
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        for batch in itertools.islice(iter(batches), num_batches):
            with torch.enable_grad():  # also when wrapping happens inside torch.no_grad()
                grads = torch.autograd.grad(_batch_loss(model, batch, weights[0].device), weights, allow_unused=True)
            for score, grad in zip(scores, grads):
                if grad is not None:
                    score += grad.float().square()
            seen += 1
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration_data yielded no batch; pass an iterable of training batches (dicts with labels).")
    return [score / seen for score in scores]


def _index_dtype(weight: torch.Tensor) -> torch.dtype:
    # int32 halves the file where it can address every entry.
    return torch.int32 if weight.numel() < 2**31 else torch.int64


def top_entries(scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Flat indices of each tensor's entries among the `budget` largest scores over all tensors."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, budget, sorted=False).indices] = True
    return [part.nonzero().reshape(-1) for part in torch.split(keep, [s.numel() for s in scores])]


def _even_entries(weights: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Shape-only stand-in for meta tensors (memory estimates): the budget spread by size."""
    total = sum(w.numel() for w in weights)
    counts = [budget * w.numel() // total for w in weights]
    counts[-1] += budget - sum(counts)
    return [torch.empty(c, dtype=torch.int64, device=w.device) for c, w in zip(counts, weights)]


def _mask_from_fisher(model: nn.Module, config: FisherConfig, calibration_data: Iterable) -> dict[str, torch.Tensor]:
    names = find_targets(model, config)
    weights = []
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module.get_base_layer() if isinstance(module, DeltaLayer) else module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise ConfigError(f"Module {name!r} ({type(module).__name__}) has no weight to sparsify; leave it out of target_modules.")
        weights.append(weight)
    budget = config.budget(sum(w.numel() for w in weights))
    if any(w.is_meta for w in weights):
        kept = _even_entries(weights, budget)
    else:
        kept = top_entries(estimate_fisher(model, weights, calibration_data, config.fisher_batches), budget)
    return {name: idx.to(_index_dtype(w)) for name, idx, w in zip(names, kept, weights) if idx.numel() > 0}


def _mask_from_file(model: nn.Module, saved_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = {}
    for key, indices in saved_tensors.items():
        if key.startswith(KEY_PREFIX) and key.endswith(_INDICES_SUFFIX):
            name = key[len(KEY_PREFIX):-len(_INDICES_SUFFIX)]
            try:
                model.get_submodule(name)
            except AttributeError:
                raise AdapterFileError(f"The Fisher-sparse adapter trains module {name!r}, which this model does not have; was it saved from another base model?") from None
            mask[name] = indices
    if not mask:
        raise AdapterFileError(f"The adapter file holds no '*{_INDICES_SUFFIX}' tensors, so it is not a Fisher-sparse adapter.")
    return mask


def attach(
    model: nn.Module,
    config: FisherConfig,
    adapter_name: str,
    calibration_data: Iterable | None = None,
    saved_tensors: dict[str, torch.Tensor] | None = None,
    **_: object,
) -> None:
    if saved_tensors is not None:
        mask = _mask_from_file(model, saved_tensors)
    elif calibration_data is not None:
        mask = _mask_from_fisher(model, config, calibration_data)
    else:
        raise ValueError("The Fisher mask is estimated from data: pass calibration_data=<iterable of batches with labels> to dt.wrap.")
    for name, indices in mask.items():
        module = model.get_submodule(name)
        if not isinstance(module, SparseDeltaLayer):
            module = SparseDeltaLayer(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config, name, indices=indices)


register_method(
    MethodInfo(
        name="fisher",
        config_class=FisherConfig,
        attach=attach,
        kind="selective",
        description="Train the top entries of the weights by diagonal Fisher information, stored sparsely",
        compare_defaults={"density": 0.01, "fisher_batches": 16, "lr": 2e-4},
        needs_calibration_data=True,
    )
)
