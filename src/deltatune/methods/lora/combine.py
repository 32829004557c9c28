"""Weighted combination of LoRA adapters into a new LoRA adapter on the same model.

    report = model.add_weighted_adapter(["math", "code"], [1.0, 0.5], "mix", combination="ties", density=0.2)
    print(report)            # per-layer approximation error of the new adapter
    model.set_adapter("mix")

Every source layer l of adapter i has the delta  Δ_i = s_i · B_i A_i  (s_i its scaling). The
combinations, with weights w_i:

- "linear": B = Σ √|w_i| B_i,  A = Σ sign(w_i) √|w_i| s_i A_i  (ranks must agree per layer).
  B A = Σ w_i Δ_i + the cross terms √|w_i w_j| B_i A_j (i ≠ j): cheap and rank-preserving, but
  it is not the weighted sum of the deltas unless only one weight is non-zero (weights (1, 0)
  give the first adapter back). "cat" and "svd" exist for the exact sum; the report gives the
  size of the cross terms.
- "cat": B = [B_1 … B_n], A = [w_1 s_1 A_1; …; w_n s_n A_n]: exactly Σ w_i Δ_i, rank Σ r_i.
- "svd": Σ w_i Δ_i truncated to `rank` by SVD (Eckart–Young: the best rank-`rank` approximation).
- "ties" (Yadav et al. 2023): the task vectors w_i Δ_i are trimmed to their top-`density` entries
  by magnitude, a sign is elected per entry, the trimmed values agreeing with it are averaged
  (disjoint merge); the result is truncated to `rank` by SVD.
- "dare_linear" / "dare_ties" (Yu et al. 2023): each entry of w_i Δ_i is dropped with probability
  1 − density and the kept ones are scaled by 1/density; then summed, or sign-elected and merged
  as TIES does; the result is truncated to `rank` by SVD.

The new adapter is plain LoRA with scaling 1 in every layer (lora_alpha = r per layer): the
weights and source scalings are folded into its factors, so its scale cannot depend on r or on
use_rslora. It targets exactly the modules some source adapts; a source that does not adapt a
layer contributes a zero delta there. modules_to_save copies combine as deltas from the
original module, θ = θ₀ + Σ w_i (θ_i − θ₀), for every combination (a source without a copy adds
nothing), so weights (1, 0) give the first adapter's copy back.

The tensor-level steps (magnitude_trim, elect_sign, disjoint_merge, ties_merge, dare_drop,
dare_linear_merge, dare_ties_merge, truncated_svd) are public and work on plain tensors.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ...config import _closest
from ...inject import plain_modules
from ...layer import DeltaLayer, ModulesToSave
from . import LoraConfig, LoraConv2d, LoraEmbedding, LoraLinear

if TYPE_CHECKING:
    from ...model import DeltaModel

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
_TRUNCATED = ("svd", "ties", "dare_linear", "dare_ties")
_LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv2d)


# -- tensor-level steps ------------------------------------------------------------------------
def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density is the fraction of entries to keep and must be in (0, 1], got {density!r}.")


def _check_sign_method(method: str) -> None:
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}.")


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density · numel) entries of largest magnitude, zero the rest (TIES' trim)."""
    _check_density(density)
    keep = round(density * tensor.numel())
    if keep >= tensor.numel():
        return tensor.clone()
    flat = tensor.flatten()
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[flat.abs().topk(keep).indices] = True
    return torch.where(kept, flat, torch.zeros_like(flat)).view_as(tensor)


def elect_sign(task_tensors: Sequence[torch.Tensor], method: str = "total") -> torch.Tensor:
    """The sign (+1 / −1) each entry of the merge takes.

    "total": the sign of the sum of the values; "frequency": the sign of (number of positive
    values − number of negative ones). A tie (0) elects +1, as peft does.
    """
    _check_sign_method(method)
    stacked = torch.stack(list(task_tensors))
    score = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(task_tensors: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the values whose sign is the elected one (zeros never agree); an
    entry where no value agrees is 0."""
    stacked = torch.stack(list(task_tensors))
    agrees = torch.where(sign > 0, stacked > 0, stacked < 0)
    total = torch.where(agrees, stacked, torch.zeros_like(stacked)).sum(0)
    return total / agrees.sum(0).clamp_min(1).to(stacked.dtype)


def ties_merge(task_tensors: Sequence[torch.Tensor], density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES: trim each task tensor to its top-density entries, elect signs, disjoint merge."""
    trimmed = [magnitude_trim(t, density) for t in task_tensors]
    return disjoint_merge(trimmed, elect_sign(trimmed, majority_sign_method))


def random_keep_mask(shape: Sequence[int], density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask keeping each entry with probability `density`. Drawn on the CPU (from
    `generator`, or torch's global generator when None) so a seed gives the same mask on any device."""
    _check_density(density)
    return torch.rand(tuple(shape), generator=generator) < density


def drop_and_rescale(tensor: torch.Tensor, keep: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's step for a given mask: dropped entries become 0, kept ones are divided by density
    so the expected value of every entry is unchanged."""
    _check_density(density)
    keep = keep.to(device=tensor.device, dtype=torch.bool)
    return torch.where(keep, tensor / density, torch.zeros_like(tensor))


def dare_drop(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept ones by 1/density."""
    return drop_and_rescale(tensor, random_keep_mask(tensor.shape, density, generator), density)


def _dare_all(
    task_tensors: Sequence[torch.Tensor], density: float, generator: torch.Generator | None, keep_masks: Sequence[torch.Tensor] | None
) -> list[torch.Tensor]:
    if keep_masks is None:
        return [dare_drop(t, density, generator) for t in task_tensors]
    if len(keep_masks) != len(task_tensors):
        raise ValueError(f"Give one keep mask per task tensor: got {len(keep_masks)} masks for {len(task_tensors)} tensors.")
    return [drop_and_rescale(t, m, density) for t, m in zip(task_tensors, keep_masks)]


def dare_linear_merge(
    task_tensors: Sequence[torch.Tensor],
    density: float,
    generator: torch.Generator | None = None,
    keep_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """DARE then the sum. keep_masks (one boolean mask per tensor) replace the random draw."""
    return torch.stack(_dare_all(task_tensors, density, generator, keep_masks)).sum(0)


def dare_ties_merge(
    task_tensors: Sequence[torch.Tensor],
    density: float,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
    keep_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint merge (DARE's drop replaces TIES' trim)."""
    _check_sign_method(majority_sign_method)
    dropped = _dare_all(task_tensors, density, generator, keep_masks)
    return disjoint_merge(dropped, elect_sign(dropped, majority_sign_method))


@dataclass
class TruncatedSVD:
    """Factors with B @ A the best rank-`rank` approximation of a matrix (B: out × rank,
    A: rank × in, each carrying √σ), and the Frobenius norms of the discarded part and the whole."""

    B: torch.Tensor
    A: torch.Tensor
    discarded_norm: float
    total_norm: float

    @property
    def relative_error(self) -> float:
        return _relative(self.discarded_norm, self.total_norm)


def truncated_svd(matrix: torch.Tensor, rank: int) -> TruncatedSVD:
    """Rank-`rank` factors of a 2-D matrix. When the matrix has fewer than `rank` singular values
    the factors are padded with zeros, so every layer of a combined adapter has the same rank."""
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}.")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = min(rank, S.numel())
    # √σ on both sides keeps B and A equally scaled, which suits further training of the adapter.
    root = S[:kept].sqrt()
    B = matrix.new_zeros(matrix.shape[0], rank)
    A = matrix.new_zeros(rank, matrix.shape[1])
    B[:, :kept] = U[:, :kept] * root
    A[:kept] = root[:, None] * Vh[:kept]
    return TruncatedSVD(B, A, discarded_norm=S[kept:].norm().item(), total_norm=S.norm().item())


def _relative(error_norm: float, reference_norm: float) -> float:
    if reference_norm == 0.0:
        return 0.0 if error_norm == 0.0 else math.inf
    return error_norm / reference_norm


# -- the report --------------------------------------------------------------------------------
@dataclass
class CombinationReport:
    """What add_weighted_adapter built and how far the new adapter is from its target.

    layer_errors: per layer, ‖ΔW_new − ΔW_target‖_F / ‖ΔW_target‖_F, where the target is the
    weighted sum Σ w_i Δ_i for linear (the cross terms), cat (exactly 0) and svd (the discarded
    singular values), and the merged task vector for ties / dare_* (the SVD truncation).
    overall_error: the same ratio over all layers together.
    """

    adapter_name: str
    combination: str
    adapters: list[str]
    weights: list[float]
    ranks: dict[str, int]
    layer_errors: dict[str, float]
    overall_error: float
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.layer_errors.values()) / max(len(self.layer_errors), 1)

    def __str__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        sources = ", ".join(f"{w:g}·{a}" for a, w in zip(self.adapters, self.weights))
        lines = [
            f"Adapter {self.adapter_name!r} = {self.combination}({sources}): rank {rank_text} over {len(self.ranks)} layers",
            f"relative Frobenius error vs. the target delta: overall {self.overall_error:.3e}, "
            f"max {self.max_error:.3e}, mean {self.mean_error:.3e}",
        ]
        worst = sorted(self.layer_errors.items(), key=lambda item: -item[1])[:5]
        if worst and worst[0][1] > 0:
            lines += ["largest layer errors:"] + [f"  {name}: {error:.3e}" for name, error in worst]
        if self.modules_to_save:
            lines.append(f"modules_to_save combined as θ₀ + Σ w_i (θ_i − θ₀): {', '.join(self.modules_to_save)}")
        return "\n".join(lines)


# -- finding the sources in the model ----------------------------------------------------------
def _wrapper_chain(module: nn.Module) -> Iterator[nn.Module]:
    """The module and every DeltaLayer under it (hybrids nest wrappers through base_layer)."""
    while isinstance(module, DeltaLayer):
        yield module
        module = module.base_layer


def _layers_holding(model: nn.Module, adapter: str, kinds: tuple[type, ...]) -> dict[str, DeltaLayer]:
    """{module path as the user names it: the wrapper of one of `kinds` holding `adapter`}."""
    found: dict[str, DeltaLayer] = {}
    for path, module in plain_modules(model):
        for layer in _wrapper_chain(module):
            if isinstance(layer, kinds) and adapter in layer.adapter_names:
                found[path] = layer
    return found


def _factor_params(layer: DeltaLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, A) parameters of one adapter in one LoRA layer."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]
    return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight


@dataclass(frozen=True)
class _Source:
    """One source adapter in one layer, as matrices with Δ = scaling · B @ A in the layer's own
    (out, in) orientation. The factors have it whatever the base stores (GPT-2's Conv1D keeps its
    weight as in × out, but lora_A / lora_B are plain nn.Linear); Conv2d kernels are flattened."""

    weight: float
    scaling: float
    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def task_vector(self) -> torch.Tensor:
        return (self.weight * self.scaling) * (self.B @ self.A)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # Combine in at least float32: SVD and sums of half-precision factors lose too much.
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _read_source(layer: DeltaLayer, adapter: str, weight: float) -> _Source:
    B, A = _factor_params(layer, adapter)
    dtype = _compute_dtype(A)
    return _Source(weight, layer.scaling[adapter], B.detach().flatten(1).to(dtype), A.detach().flatten(1).to(dtype))


def _sources_per_layer(model: DeltaModel, adapters: Sequence[str], weights: Sequence[float]) -> dict[str, list[_Source]]:
    """{layer path: the sources adapting it}, in model order; layers a source lacks are left out
    of its list (a zero delta adds nothing to any combination)."""
    per_adapter = [_layers_holding(model.model, a, _LORA_LAYERS) for a in adapters]
    paths = [p for p, _ in plain_modules(model.model) if any(p in layers for layers in per_adapter)]
    return {
        path: [_read_source(layers[path], a, w) for a, w, layers in zip(adapters, weights, per_adapter) if path in layers]
        for path in paths
    }


# -- combining one layer -----------------------------------------------------------------------
@dataclass
class _Combined:
    B: torch.Tensor
    A: torch.Tensor
    error_norm: float
    target_norm: float


def _exact_sum(sources: Sequence[_Source]) -> torch.Tensor:
    return torch.stack([s.task_vector() for s in sources]).sum(0)


def _linear(path: str, sources: Sequence[_Source]) -> _Combined:
    ranks = {s.rank for s in sources}
    if len(ranks) > 1:
        raise ValueError(
            f"combination='linear' needs the same rank in every source, but layer {path} has ranks "
            f"{sorted(ranks)}. Use combination='cat' (exact, rank = sum) or 'svd' (rank of your choice)."
        )
    # √|w| on both factors and sign(w)·s on A: the B_i A_i term gets w_i·s_i, as in the exact sum.
    roots = [math.sqrt(abs(s.weight)) for s in sources]
    B = torch.stack([r * s.B for r, s in zip(roots, sources)]).sum(0)
    A = torch.stack([math.copysign(r, s.weight) * s.scaling * s.A for r, s in zip(roots, sources)]).sum(0)
    target = _exact_sum(sources)
    return _Combined(B, A, error_norm=(B @ A - target).norm().item(), target_norm=target.norm().item())


def _cat(sources: Sequence[_Source]) -> _Combined:
    B = torch.cat([s.B for s in sources], dim=1)
    A = torch.cat([(s.weight * s.scaling) * s.A for s in sources], dim=0)
    return _Combined(B, A, error_norm=0.0, target_norm=0.0)  # exact by construction


@dataclass(frozen=True)
class _Options:
    combination: str
    rank: int
    density: float | None
    majority_sign_method: str
    generator: torch.Generator | None


def _merged_delta(sources: Sequence[_Source], options: _Options) -> torch.Tensor:
    """The full delta the truncated combinations approximate."""
    if options.combination == "svd":
        return _exact_sum(sources)
    vectors = [s.task_vector() for s in sources]
    if options.combination == "ties":
        return ties_merge(vectors, options.density, options.majority_sign_method)
    if options.combination == "dare_linear":
        return dare_linear_merge(vectors, options.density, options.generator)
    return dare_ties_merge(vectors, options.density, options.majority_sign_method, options.generator)


def _combine_layer(path: str, sources: Sequence[_Source], options: _Options) -> _Combined:
    if options.combination == "linear":
        return _linear(path, sources)
    if options.combination == "cat":
        return _cat(sources)
    low_rank = truncated_svd(_merged_delta(sources, options), options.rank)
    return _Combined(low_rank.B, low_rank.A, low_rank.discarded_norm, low_rank.total_norm)


# -- modules_to_save ----------------------------------------------------------------------------
def _combined_copies(model: DeltaModel, adapters: Sequence[str], weights: Sequence[float]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: state of the new copy}, each θ₀ + Σ w_i (θ_i − θ₀) over the sources with a copy."""
    per_adapter = [_layers_holding(model.model, a, (ModulesToSave,)) for a in adapters]
    paths = [p for p, _ in plain_modules(model.model) if any(p in layers for layers in per_adapter)]
    combined = {}
    for path in paths:
        holders = [(layers[path], a, w) for a, w, layers in zip(adapters, weights, per_adapter) if path in layers]
        merged = sorted({n for layer, _, _ in holders for n in layer.merged_adapters})
        if merged:
            raise RuntimeError(
                f"Adapters {merged} are merged into {path}, so its original weights are swapped out; "
                f"unmerge() before combining adapters."
            )
        combined[path] = _combined_state(holders)
    return combined


def _combined_state(holders: Sequence[tuple[ModulesToSave, str, float]]) -> dict[str, torch.Tensor]:
    original = holders[0][0].get_base_layer().state_dict()
    copies = [(layer.modules_to_save[a].state_dict(), w) for layer, a, w in holders]
    state = {}
    for key, base in original.items():
        if not base.is_floating_point():
            state[key] = copies[0][0][key].clone()  # counters (e.g. BatchNorm's) do not combine
            continue
        dtype = _compute_dtype(base)
        delta = sum(w * (copy[key].to(dtype) - base.to(dtype)) for copy, w in copies)
        state[key] = (base.to(dtype) + delta).to(base.dtype)
    return state


def _modules_to_save_union(model: DeltaModel, adapters: Sequence[str]) -> list[str]:
    names: list[str] = []
    for adapter in adapters:
        for name in model.configs[adapter].modules_to_save or []:
            if name not in names:
                names.append(name)
    return names


# -- checks ---------------------------------------------------------------------------------------
def _check_sources(model: DeltaModel, adapters: Sequence[str], weights: Sequence[float]) -> None:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}.")
    if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise ValueError(f"Give one weight per adapter: got {len(adapters)} adapters {list(adapters)} and weights {weights!r}.")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {bad}.")
    unknown = [a for a in adapters if a not in model.configs]
    if unknown:
        raise ValueError(f"No adapter named {unknown}; this model has {model.adapter_names}.")
    for adapter in adapters:
        _check_lora_source(adapter, model.configs[adapter])


def _check_lora_source(adapter: str, config: object) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"Adapter {adapter!r} is a {getattr(config, 'method', type(config).__name__)!r} adapter; only LoRA "
            f"adapters combine into a LoRA adapter. Leave it out of `adapters`."
        )
    if config.use_dora:
        raise ValueError(
            f"Adapter {adapter!r} uses DoRA: its magnitude vector rescales W + ΔW per output, so DoRA "
            f"adapters do not combine as sums of low-rank deltas. Combine plain LoRA adapters only."
        )
    if config.init_lora_weights == "pissa":
        raise ValueError(
            f"Adapter {adapter!r} was initialised with PiSSA, which rewrote the base weight to a residual; "
            f"its factors are not a delta over the original model, so they cannot be combined."
        )


def _check_options(
    combination: str, rank: int | None, density: float | None, majority_sign_method: str, max_source_rank: int
) -> int:
    """Validate the options of `combination`; returns the rank truncated combinations use."""
    if combination not in COMBINATIONS:
        raise ValueError(f"Unknown combination {combination!r}.{_closest(combination, list(COMBINATIONS))} Choose one of {COMBINATIONS}.")
    _check_sign_method(majority_sign_method)
    if combination in _NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"combination={combination!r} needs density=<fraction of entries to keep, in (0, 1]>, e.g. 0.2.")
        _check_density(density)
    elif density is not None:
        raise ValueError(f"density applies to {_NEEDS_DENSITY} only; combination={combination!r} keeps every entry. Drop density.")
    if combination not in _TRUNCATED:
        if rank is not None:
            raise ValueError(
                f"rank applies to {_TRUNCATED} only: 'linear' keeps the sources' rank and 'cat' their sum. "
                f"Drop rank, or use combination='svd'."
            )
        return 0
    if rank is None:
        return max_source_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    return rank


# -- the new adapter ------------------------------------------------------------------------------
def _combined_config(model: DeltaModel, adapters: Sequence[str], ranks: dict[str, int]) -> LoraConfig:
    """Plain LoRA on exactly the combined layers, with scaling 1 everywhere (alpha = r per layer)."""
    configs = [model.configs[a] for a in adapters]
    common = Counter(ranks.values()).most_common(1)[0][0]
    # Full module names, escaped: pattern keys are regexes matched at the end of a module name.
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != common}
    task_types = {c.task_type for c in configs}
    return LoraConfig(
        target_modules=list(ranks),
        r=common,
        lora_alpha=common,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=configs[0].lora_dropout,
        # The factors are written after creation; a PiSSA init would rewrite the base weight on load.
        init_lora_weights=True,
        modules_to_save=_modules_to_save_union(model, adapters) or None,
        base_model_name_or_path=configs[0].base_model_name_or_path,
        task_type=task_types.pop() if len(task_types) == 1 else None,
    )


def _write_factors(model: DeltaModel, adapter_name: str, layers: dict[str, _Combined]) -> None:
    created = _layers_holding(model.model, adapter_name, _LORA_LAYERS)
    if set(created) != set(layers):
        raise RuntimeError(
            f"The combined adapter landed on other layers than its sources ({sorted(set(created) ^ set(layers))}); "
            f"this is a deltatune bug, please report it."
        )
    for path, combined in layers.items():
        B, A = _factor_params(created[path], adapter_name)
        if A.shape[0] != combined.A.shape[0]:
            raise RuntimeError(f"Layer {path} got rank {A.shape[0]} instead of {combined.A.shape[0]}; this is a deltatune bug.")
        B.copy_(combined.B.reshape(B.shape))
        A.copy_(combined.A.reshape(A.shape))


def _write_copies(model: DeltaModel, adapter_name: str, copies: dict[str, dict[str, torch.Tensor]]) -> None:
    created = _layers_holding(model.model, adapter_name, (ModulesToSave,))
    for path, state in copies.items():
        created[path].modules_to_save[adapter_name].load_state_dict(state)


def _attach(
    model: DeltaModel, adapter_name: str, config: LoraConfig, layers: dict[str, _Combined], copies: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Add the adapter inactive and write its tensors; on any failure the model is left as it was."""
    previous_active = list(model.active_adapters)
    model.add_adapter(adapter_name, config, activate=False)
    try:
        # add_adapter activates a model's first active adapter; the combined one must stay off.
        model.set_adapter(previous_active)
        with torch.no_grad():
            _write_factors(model, adapter_name, layers)
            _write_copies(model, adapter_name, copies)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def add_weighted_adapter(
    model: DeltaModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> CombinationReport:
    """Add `adapter_name`, a LoRA adapter combining the LoRA `adapters` with `weights`
    (see the module docstring for each combination); it is added inactive.

    rank: the rank of svd / ties / dare_* (default: the largest source rank).
    density: the fraction of entries ties / dare_* keep, in (0, 1].
    majority_sign_method: "total" or "frequency" (ties, dare_ties).
    seed: makes dare_*'s random drop reproducible (None: torch's global generator).
    """
    _check_sources(model, adapters, weights)
    if adapter_name in model.configs:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name for the combination.")
    weights = [float(w) for w in weights]
    with torch.no_grad():
        sources = _sources_per_layer(model, adapters, weights)
        max_rank = max(s.rank for layer in sources.values() for s in layer)
        options = _Options(
            combination,
            _check_options(combination, rank, density, majority_sign_method, max_rank),
            density,
            majority_sign_method,
            torch.Generator().manual_seed(seed) if seed is not None else None,
        )
        layers = {path: _combine_layer(path, layer_sources, options) for path, layer_sources in sources.items()}
        copies = _combined_copies(model, adapters, weights)
    ranks = {path: combined.A.shape[0] for path, combined in layers.items()}
    _attach(model, adapter_name, _combined_config(model, adapters, ranks), layers, copies)
    return CombinationReport(
        adapter_name=adapter_name,
        combination=combination,
        adapters=list(adapters),
        weights=weights,
        ranks=ranks,
        layer_errors={path: _relative(c.error_norm, c.target_norm) for path, c in layers.items()},
        overall_error=_relative(math.hypot(*(c.error_norm for c in layers.values())), math.hypot(*(c.target_norm for c in layers.values()))),
        modules_to_save=list(copies),
    )


__all__ = [
    "COMBINATIONS", "CombinationReport", "TruncatedSVD", "add_weighted_adapter", "dare_drop", "dare_linear_merge",
    "dare_ties_merge", "disjoint_merge", "drop_and_rescale", "elect_sign", "magnitude_trim", "random_keep_mask",
    "ties_merge", "truncated_svd",
]
