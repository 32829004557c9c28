"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to where it matters.

W x  becomes  W x + s · P Λ Q x  with Q (r × in, `lora_A`), Λ = diag(E) (`lora_E`, r × 1), P
(out × r, `lora_B`) and s = lora_alpha / init_r. Training adds an orthogonality penalty
‖QQᵀ − I‖ + ‖PᵀP − I‖ (averaged over matrices, times `orth_reg_weight`) to the model's loss.
After each optimizer step `adalora_step` scores every triplet (Pᵢ, λᵢ, Qᵢ) by its sensitivity
|w · ∂L/∂w|, smoothed by an exponential moving average (beta1) and multiplied by the moving
average of its uncertainty (beta2), and keeps the highest-scoring triplets within a budget that
falls from init_r per module to target_r per module on a cubic schedule:

    steps 1 … tinit                        warm-up, full budget, scores accumulate
    tinit … total_step − tfinal            budget shrinks cubically; triplets masked every deltaT steps
    total_step − tfinal                    the final pattern: exactly target_r × modules triplets kept
    after that                             the pattern is frozen (re-applied after every step)

Masking zeroes λᵢ (P and Q rows stay, so a triplet can come back while the budget moves). The
saved file holds only the kept triplets and the config's `rank_pattern` their count per module,
so loading rebuilds the pruned shapes. Field names and tensor names follow Hugging Face peft.

How a training loop drives it: deltatune's `train` calls `model.after_optimizer_step(step)` after
each optimizer step, which reaches `adalora_step` through this method's registered hook. A loop of
your own does the same, or passes `adalora_callback(step, model, optimizer)` (each step counts once):

    train(model, data, TrainConfig(max_steps=N))   # model from dt.wrap(..., AdaLoraConfig(total_step=N))

The orthogonality penalty is added to `output.loss` by a forward hook while the model trains, so
loops that use the model's loss need nothing more; for a model that returns no loss, add
`config.orth_reg_weight * adalora_orthogonality_loss(model)` to yours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import AdapterConfig, ConfigError
from ..hf_compat import is_conv1d
from ..inject import inject_layers
from ..layer import DeltaLayer
from ..model import written_out_targets
from ..registry import MethodInfo, register_method


@dataclass
class AdaLoraConfig(AdapterConfig):
    """init_r: rank per module at the start; target_r: average kept rank per module at the end;
    total_step: optimizer steps of the whole run (required: the schedule is laid out on it);
    tinit / tfinal: steps of warm-up (full budget) and of final training (pattern frozen);
    deltaT: steps between re-allocations; beta1 / beta2: EMA factors of the sensitivity and of
    its uncertainty; orth_reg_weight: weight of the orthogonality penalty;
    lora_alpha: scale numerator (the update is scaled by lora_alpha / init_r);
    rank_pattern: {module name: kept rank}, written by training, read when loading."""

    method = "adalora"
    peft_type = "ADALORA"
    # LoRA fields peft writes into AdaLoRA files; AdaLoRA ignores them.
    tolerated_foreign_fields = AdapterConfig.tolerated_foreign_fields | {
        "r", "bias", "init_lora_weights", "qalora_group_size", "alpha_pattern",
    }

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank_pattern = _normalise_rank_pattern(self.rank_pattern or {})
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ConfigError(f"init_r must be a positive integer, got {self.init_r!r}.")
        if not isinstance(self.target_r, int) or self.target_r <= 0:
            raise ConfigError(f"target_r must be a positive integer, got {self.target_r!r}.")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} is above init_r={self.init_r}: AdaLoRA only prunes ranks. "
                f"Raise init_r to at least {self.target_r} or lower target_r."
            )
        if self.total_step is None or self.total_step <= 0:
            raise ConfigError(
                f"AdaLoRA needs total_step, the number of optimizer steps of the training run (got {self.total_step!r}); "
                f"its rank budget schedule is laid out on it. Set total_step=<max_steps>."
            )
        if min(self.tinit, self.tfinal) < 0 or self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                f"tinit={self.tinit} + tfinal={self.tfinal} leave no budgeting phase in total_step={self.total_step} "
                f"steps; they must be >= 0 and sum to less than total_step."
            )
        if self.deltaT < 1:
            raise ConfigError(f"deltaT must be >= 1 (steps between re-allocations), got {self.deltaT}.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or not 0 <= v <= self.init_r}
        if bad:
            raise ConfigError(f"rank_pattern ranks must be integers in [0, init_r={self.init_r}], got {bad}.")

    @property
    def final_step(self) -> int:
        """The step at which the final rank pattern is fixed."""
        return self.total_step - self.tfinal


def _normalise_rank_pattern(pattern: dict[str, Any]) -> dict[str, int]:
    # peft stores {"<module>.lora_E[.<adapter>]": [kept flags]}; we store {"<module>": kept count}.
    normalised = {}
    for key, value in pattern.items():
        module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key.removeprefix("base_model.model."))
        normalised[module] = int(sum(bool(v) for v in value)) if isinstance(value, list) else value
    return normalised


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision adapter weights lose the small updates; keep them in float32 like peft does.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype


class AdaLoraLinear(DeltaLayer):
    """The SVD-form update on nn.Linear or GPT-2's Conv1D (whose weight is stored in × out)."""

    adapter_attributes = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d(base)
        self.in_features, self.out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.module_name: dict[str, str] = {}
        # Per adapter: kept-triplet mask, and {"A"|"E"|"B": (EMA sensitivity, EMA uncertainty)}.
        self.kept: dict[str, torch.Tensor] = {}
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.host_hooks: dict[str, Any] = {}

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        rank = config.rank_pattern.get(module_name, config.init_r)
        weight = self.get_base_layer().weight
        kwargs = {"device": weight.device, "dtype": _adapter_dtype(weight)}
        # peft's init: E = 0 so the output starts unchanged; P, Q small and random.
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(rank, self.in_features, **kwargs) * 0.02)
        self.lora_E[adapter_name] = nn.Parameter(torch.zeros(rank, 1, **kwargs))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, rank, **kwargs) * 0.02)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = config.lora_alpha / config.init_r
        self.module_name[adapter_name] = module_name
        self.kept[adapter_name] = torch.ones(rank, dtype=torch.bool)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for store in (self.scaling, self.module_name, self.kept, self.importance):
            store.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        handle = self.host_hooks.pop(adapter_name, None)
        if handle is not None:
            handle.remove()

    def rank(self, adapter_name: str) -> int:
        """Triplets currently kept (all of them until the first allocation)."""
        return int(self.kept[adapter_name].sum())

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, E, B = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        delta = (B @ (A * E)) * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_unmerged():
            if name not in self.lora_A:
                continue
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            x_lora = self.lora_dropout[name](x.to(A.dtype))
            update = (x_lora @ (A * E).T) @ B.T * self.scaling[name]
            result = result + update.to(result.dtype)
        return result

    # -- rank allocation ------------------------------------------------------------------
    def update_importance(self, adapter_name: str, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivity |w · grad| into the moving averages (needs the grads)."""
        state = self.importance.setdefault(adapter_name, {})
        with torch.no_grad():
            for key, container in (("A", self.lora_A), ("E", self.lora_E), ("B", self.lora_B)):
                param = container[adapter_name]
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                average, uncertainty = state.get(key) or (torch.zeros_like(param), torch.zeros_like(param))
                average = beta1 * average + (1 - beta1) * sensitivity
                uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - average).abs()
                state[key] = (average, uncertainty)

    def triplet_scores(self, adapter_name: str) -> torch.Tensor:
        """One score per triplet: its λ's score plus the mean scores of its Q row and P column."""
        state = self.importance.get(adapter_name, {})
        rank = self.lora_E[adapter_name].shape[0]
        device = self.lora_E[adapter_name].device

        def score(key: str, dim: int | None) -> torch.Tensor:
            if key not in state:
                return torch.zeros(rank, device=device)
            average, uncertainty = state[key]
            element = average * uncertainty
            return element.view(-1) if dim is None else element.mean(dim=dim)

        return score("E", None) + score("A", 1) + score("B", 0)

    def apply_mask(self, adapter_name: str, kept: torch.Tensor | None = None) -> None:
        """Zero λ of the triplets not kept (with `kept`, first make it the new pattern)."""
        if kept is not None:
            self.kept[adapter_name] = kept.detach().to("cpu", torch.bool)
        E = self.lora_E[adapter_name]
        with torch.no_grad():
            E.masked_fill_(~self.kept[adapter_name].to(E.device)[:, None], 0.0)

    # -- files ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Only the kept triplets: the file holds the pruned shapes that `rank_pattern` describes."""
        kept = self.kept[adapter_name].to(self.lora_E[adapter_name].device)
        if bool(kept.all()):
            return super().adapter_state_dict(adapter_name)
        return {
            "lora_A": self.lora_A[adapter_name][kept],
            "lora_E": self.lora_E[adapter_name][kept],
            "lora_B": self.lora_B[adapter_name][:, kept],
        }


def _layer_for(module: nn.Module) -> type[DeltaLayer] | None:
    return AdaLoraLinear if isinstance(module, nn.Linear) or is_conv1d(module) else None


def _adalora_layers(model: nn.Module, adapter_name: str) -> list[AdaLoraLinear]:
    return [m for m in model.modules() if isinstance(m, AdaLoraLinear) and adapter_name in m.lora_A]


def adalora_orthogonality_loss(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """Mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over the active (or the named) adapter's matrices."""
    terms = []
    for layer in model.modules():
        if not isinstance(layer, AdaLoraLinear):
            continue
        names = [adapter_name] if adapter_name is not None else layer.active_unmerged()
        for name in names:
            if name not in layer.lora_A or layer.lora_A[name].shape[0] == 0:
                continue
            A, B = layer.lora_A[name], layer.lora_B[name]
            eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
            terms.append(torch.linalg.matrix_norm(A @ A.T - eye))
            terms.append(torch.linalg.matrix_norm(B.T @ B - eye))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def _orthogonality_hook(adapter_name: str, weight: float) -> Callable:
    """A forward hook adding the penalty to the model's loss while it trains with this adapter on."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or not isinstance(output, dict) or not torch.is_tensor(output.get("loss")):
            return output
        layers = [l for l in _adalora_layers(module, adapter_name) if adapter_name in l.active_unmerged()]
        if layers:
            output["loss"] = output["loss"] + weight * adalora_orthogonality_loss(module, adapter_name).to(output["loss"].device)
        return output

    return hook


def budget_at(config: AdaLoraConfig, step: int, modules: int) -> tuple[int, bool]:
    """(total rank budget, whether to re-allocate now) at optimizer step `step` (1-based)."""
    initial, target = config.init_r * modules, config.target_r * modules
    if step <= config.tinit:
        return initial, False
    if step >= config.final_step:
        return target, step == config.final_step
    remaining = 1 - (step - config.tinit) / (config.final_step - config.tinit)
    return int((initial - target) * remaining**3 + target), step % config.deltaT == 0


def _allocate(layers: list[AdaLoraLinear], adapter_name: str, budget: int) -> dict[str, int]:
    """Keep the `budget` highest-scoring triplets over all modules; returns kept rank per module."""
    scores = [layer.triplet_scores(adapter_name) for layer in layers]
    flat = torch.cat([s.float().cpu() for s in scores])
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    # topk, unlike a threshold, keeps exactly `budget` triplets even when scores tie.
    kept[torch.topk(flat, min(budget, flat.numel())).indices] = True
    pattern = {}
    for layer, layer_kept in zip(layers, torch.split(kept, [s.numel() for s in scores])):
        layer.apply_mask(adapter_name, layer_kept)
        pattern[layer.module_name[adapter_name]] = int(layer_kept.sum())
    return pattern


def adalora_step(model: nn.Module, step: int, adapter_name: str | None = None) -> dict[str, dict[str, int]]:
    """Run after optimizer step `step` (1-based), before gradients are cleared.

    Updates importance scores, re-allocates ranks when the schedule says so, and records the
    rank pattern in the adapter's config so `model.save()` writes it. `model` is the DeltaModel
    from dt.wrap(); every active AdaLoRA adapter takes part, or only `adapter_name`.
    Returns {adapter name: {module: kept rank}} for the adapters re-allocated now.
    """
    configs = getattr(model, "configs", None)
    if configs is None:
        raise TypeError(
            f"adalora_step needs the model returned by dt.wrap() (it records the rank pattern in the adapter's "
            f"config), got {type(model).__name__}."
        )
    changed = {}
    # The training loop calls this through DeltaModel.after_optimizer_step; a hand-written loop may
    # also pass adalora_callback. Either way each step counts once.
    last_steps = model.__dict__.setdefault("_adalora_last_step", {})
    for name, config in list(configs.items()):
        if not isinstance(config, AdaLoraConfig) or name not in model.active_adapters or config.inference_mode:
            continue
        if (adapter_name is not None and name != adapter_name) or last_steps.get(name) == step:
            continue
        last_steps[name] = step
        layers = _adalora_layers(model, name)
        if step < config.final_step:
            for layer in layers:
                layer.update_importance(name, config.beta1, config.beta2)
        elif step > config.final_step:
            for layer in layers:  # the optimizer may have moved masked λ away from zero
                layer.apply_mask(name)
            continue
        budget, allocate_now = budget_at(config, step, len(layers))
        if allocate_now:
            pattern = _allocate(layers, name, budget)
            configs[name] = config.replace(rank_pattern=pattern)
            changed[name] = pattern
        if step == config.final_step:
            for layer in layers:
                layer.importance.pop(name, None)  # no longer needed: free the memory
    return changed


def adalora_callback(step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """adalora_step in the signature of deltatune's train(step_callbacks=[...])."""
    adalora_step(model, step)


def _attach(model: nn.Module, config: AdaLoraConfig, adapter_name: str, **_: Any) -> None:
    names = inject_layers(model, config, adapter_name, _layer_for, None)
    if config.inference_mode or config.orth_reg_weight == 0:
        return
    handle = model.register_forward_hook(_orthogonality_hook(adapter_name, config.orth_reg_weight))
    for name in names:
        model.get_submodule(name).host_hooks[adapter_name] = handle


register_method(
    MethodInfo(
        name="adalora",
        config_class=AdaLoraConfig,
        attach=_attach,
        kind="reparameterized",
        description="SVD-form LoRA whose rank budget is re-allocated by importance during training",
        after_step=lambda model, name, config, step: adalora_step(model, step, name),
        run_length_field="total_step",
        resolve_targets=written_out_targets,
        # Average rank 6 -> 4 ends at LoRA's r=4 and alpha/r=2. The comparison sets total_step to its
        # run length; warm-up and final phases this short fit any run of 31 steps or more.
        compare_defaults={
            "init_r": 6, "target_r": 4, "lora_alpha": 12, "total_step": 188, "tinit": 10, "tfinal": 20,
            "deltaT": 5, "orth_reg_weight": 0.1, "lr": 1e-3,
        },
    )
)

__all__ = [
    "AdaLoraConfig", "AdaLoraLinear", "adalora_callback", "adalora_orthogonality_loss", "adalora_step", "budget_at",
]
