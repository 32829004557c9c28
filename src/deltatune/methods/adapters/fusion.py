"""AdapterFusion (Pfeiffer et al. 2021): learn to combine trained bottleneck adapters by attention.

Several bottleneck adapters (methods/adapters.py), each trained on its own task, sit on the same
modules of one model. A fusion adds, at every such site, an attention over the adapters' outputs
and trains only that (plus, usually, a fresh task head), with the adapters frozen:

    x      the adapters' common input: for Houlsby/Pfeiffer placement the wrapped module's output h
           (the feed-forward or attention output before any adapter), as in the paper; for the
           parallel placement the block's input, which is what parallel adapters read
    z_i    = adapter_i(x), the i-th adapter's contribution (its output without the residual)
    s_i    = softmax_i( Q(x) · K(z_i) / temperature )
    output = h + V(Σ_i s_i z_i)        (sequential; parallel: block(x) + V(Σ_i s_i z_i))

The paper (and its reference implementation, adapter-transformers' default "dynamic" fusion)
value-projects each z_i and then mixes; because the weights s_i sum to one, Σ s_i V(z_i) equals
V(Σ s_i z_i), which is computed instead (one projection instead of N).

Initialisation, as in the reference implementation: V is the identity (bias zero) and Q, K are
normal with std `init_std` (default 0.02, biases zero). The scores then start near zero, so an
untrained fusion outputs h plus (nearly) the average of the adapters' contributions; with Q at
zero it is that average exactly. `value_regularization` adds λ·Σ_sites ‖V − I‖²_F to the training
loss (the reference implementation's default λ = 0.01) so V stays close to the identity.

Activation: `set_adapter("fusion")` makes only the fusion's parameters trainable, yet its layers
run the fused adapters themselves; the adapters need not (and usually should not) be active.
Activating a fused adapter beside its fusion makes that adapter trainable too; it still runs once,
inside the fusion. Other active bottleneck adapters at a site run as they would without the fusion
(sequential ones after the fused output). One fusion per site can be active at a time.

Files: `model.save(dir, "fusion")` writes the fusion's tensors and a config naming the fused
adapters; loading it needs those adapters on the model already. `save_fusion` / `load_fusion`
keep a fusion together with its adapters:

    directory/fusion/                    the fusion (adapter_config.json + adapter_model.safetensors)
    directory/adapters/<adapter name>/   each fused adapter, as model.save writes it

Not mergeable (the attention depends on the input), and per-row adapters (mixed batches) are not
supported for a fusion; its fused adapters can still be named per row on their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...config import AdapterConfig, ConfigError, read_config_dict
from ...inject import find_targets, plain_modules, set_submodule
from ...io import AdapterFileError
from ...layer import DeltaLayer
from ...model import DeltaModel
from ...registry import MethodInfo, register_method
from . import ParallelAdapterLayer, _BottleneckLayer

FUSION_FOLDER = "fusion"
ADAPTERS_FOLDER = "adapters"


@dataclass
class FusionConfig(AdapterConfig):
    """adapters: names of two or more bottleneck adapters already on the model, to be fused;
    temperature: divides the attention scores (above 1: softer mixing, below 1: sharper);
    init_std: std of the query and key weights at init (small: the fusion starts averaging);
    value_regularization: λ of the penalty λ·Σ‖V − I‖² that keeps the value projection near the
        identity (0 switches it off);
    target_modules: None for every module that holds all the named adapters, or a subset of them
        (names or a regex as for any method; layers_to_transform and exclude_modules apply too)."""

    method = "fusion"
    peft_type = "ADAPTER_FUSION"

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0
    init_std: float = 0.02
    value_regularization: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.adapters, tuple):
            self.adapters = list(self.adapters)
        elif isinstance(self.adapters, set):
            self.adapters = sorted(self.adapters)  # a set has no order; a saved config should have one
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        # An empty list is only refused when the fusion is attached: the comparison job builds
        # every registered method's config without adapters to fuse, and must not fail for it.
        if not isinstance(self.adapters, list) or not all(isinstance(n, str) and n for n in self.adapters):
            raise ConfigError(f"adapters must be a list of adapter names, got {self.adapters!r}.")
        duplicates = sorted({n for n in self.adapters if self.adapters.count(n) > 1})
        if duplicates:
            raise ConfigError(f"adapters lists {duplicates} more than once; list each adapter to fuse once.")
        if len(self.adapters) == 1:
            raise ConfigError(
                f"adapters={self.adapters} names one adapter; a fusion combines two or more "
                f"(to keep training one adapter, activate it instead)."
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}.")
        if not self.init_std > 0:
            raise ConfigError(f"init_std must be > 0 (with query and key both at zero neither ever trains), got {self.init_std!r}.")
        if self.value_regularization < 0:
            raise ConfigError(f"value_regularization must be >= 0, got {self.value_regularization!r}.")


class AdapterAttention(nn.Module):
    """The fusion at one site: attention of the adapters' input over the adapters' outputs."""

    def __init__(self, features: int, config: FusionConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kwargs = {"device": device, "dtype": dtype}
        self.query = nn.Linear(features, features, **kwargs)
        self.key = nn.Linear(features, features, **kwargs)
        self.value = nn.Linear(features, features, **kwargs)
        self.temperature = config.temperature
        with torch.no_grad():
            for projection in (self.query, self.key):
                nn.init.normal_(projection.weight, std=config.init_std)
                nn.init.zeros_(projection.bias)
            nn.init.eye_(self.value.weight)
            nn.init.zeros_(self.value.bias)

    def attention_weights(self, adapter_input: torch.Tensor, adapter_outputs: torch.Tensor) -> torch.Tensor:
        """Softmax over adapters, shape (..., N), for input (..., d) and stacked outputs (..., N, d)."""
        query = self.query(adapter_input).unsqueeze(-1)  # (..., d, 1)
        scores = (self.key(adapter_outputs) @ query).squeeze(-1)  # (..., N)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, adapter_input: torch.Tensor, adapter_outputs: torch.Tensor) -> torch.Tensor:
        weights = self.attention_weights(adapter_input, adapter_outputs)
        mixed = (weights.unsqueeze(-2) @ adapter_outputs).squeeze(-2)  # (..., d)
        return self.value(mixed)

    def value_drift(self) -> torch.Tensor:
        """‖V − I‖²_F, the quantity value_regularization penalises."""
        identity = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return (self.value.weight - identity).pow(2).sum()


class FusionLayer(DeltaLayer):
    """Wraps one bottleneck-adapter layer; an active fusion replaces that layer's forward."""

    adapter_attributes = ("fusion",)

    def __init__(self, base_layer: _BottleneckLayer) -> None:
        if not isinstance(base_layer, _BottleneckLayer):
            raise TypeError(f"FusionLayer wraps a bottleneck adapter layer, got {type(base_layer).__name__}.")
        super().__init__(base_layer)
        self.fusion = nn.ModuleDict()
        self.fused_adapters: dict[str, list[str]] = {}

    @property
    def adapter_layer(self) -> _BottleneckLayer:
        return self.base_layer

    def add_adapter(self, adapter_name: str, config: FusionConfig, module_name: str) -> None:
        missing = [n for n in config.adapters if n not in self.adapter_layer.bottleneck]
        if missing:
            raise ConfigError(f"Module {module_name!r} holds no bottleneck adapter {missing}; cannot fuse it there.")
        # The fusion follows the adapters' own device and dtype (float32 beside a half-precision base).
        reference = self.adapter_layer.bottleneck[config.adapters[0]].up.weight
        features = reference.shape[0]
        self.fusion[adapter_name] = AdapterAttention(features, config, reference.device, reference.dtype)
        self.fused_adapters[adapter_name] = list(config.adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.fused_adapters.pop(adapter_name, None)

    # -- forward --------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> torch.Tensor:
        fusion_name = self._active_fusion()
        if fusion_name is None:
            return self.base_layer(*args, **kwargs)
        if isinstance(self.adapter_layer, ParallelAdapterLayer):
            return self._parallel_forward(fusion_name, *args, **kwargs)
        return self._sequential_forward(fusion_name, *args, **kwargs)

    def _active_fusion(self) -> str | None:
        active = self.active_unmerged()
        if len(active) > 1:
            raise RuntimeError(
                f"Fusions {active} are active at the same module; activate one fusion at a time "
                f"(model.set_adapter(name))."
            )
        return active[0] if active else None

    def _sequential_forward(self, fusion_name: str, *args, **kwargs) -> torch.Tensor:
        layer = self.adapter_layer
        hidden = layer.base_layer(*args, **kwargs)
        result = hidden + self._fused(fusion_name, hidden)
        for name in self._unfused_active(fusion_name):
            result = result + layer.bottleneck[name](result)
        return result

    def _parallel_forward(self, fusion_name: str, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.adapter_layer
        if layer.residual_inside:
            # BERT-style output module: forward(hidden_states, input_tensor) adds input_tensor (the
            # block's input) inside its LayerNorm; the adapters read it and add to it, as there.
            if args:
                residual, args = args[0], args[1:]
            else:
                residual = kwargs.pop("input_tensor")
            return layer.base_layer(hidden_states, residual + self._parallel_delta(fusion_name, residual), *args, **kwargs)
        return layer.base_layer(hidden_states, *args, **kwargs) + self._parallel_delta(fusion_name, hidden_states)

    def _parallel_delta(self, fusion_name: str, adapter_input: torch.Tensor) -> torch.Tensor:
        delta = self._fused(fusion_name, adapter_input)
        for name in self._unfused_active(fusion_name):
            delta = delta + self.adapter_layer.bottleneck[name](adapter_input)
        return delta

    def _fused(self, fusion_name: str, adapter_input: torch.Tensor) -> torch.Tensor:
        """V(Σ_i s_i z_i) for the fused adapters' outputs z_i on adapter_input."""
        names = self._fused_names(fusion_name)
        outputs = torch.stack([self.adapter_layer.bottleneck[n](adapter_input) for n in names], dim=-2)
        attention = self.fusion[fusion_name]
        dtype = attention.value.weight.dtype
        return attention(adapter_input.to(dtype), outputs.to(dtype)).to(adapter_input.dtype)

    def _fused_names(self, fusion_name: str) -> list[str]:
        names = self.fused_adapters[fusion_name]
        deleted = [n for n in names if n not in self.adapter_layer.bottleneck]
        if deleted:
            raise RuntimeError(
                f"Fusion {fusion_name!r} fuses adapters {deleted}, which were deleted from the model; "
                f"load them again or delete_adapter({fusion_name!r})."
            )
        return names

    def _unfused_active(self, fusion_name: str) -> list[str]:
        """Active adapters of the wrapped layer that this fusion does not run itself."""
        layer, fused = self.adapter_layer, set(self.fused_adapters[fusion_name])
        return [n for n in layer.active_unmerged() if n in layer.bottleneck and n not in fused]


# -- attaching ----------------------------------------------------------------------------------
def _adapter_layer_holding(module: nn.Module, names: list[str]) -> _BottleneckLayer | None:
    """The bottleneck layer in a stack of wrappers that holds every adapter in `names`, if any."""
    while isinstance(module, DeltaLayer):
        if isinstance(module, _BottleneckLayer) and all(n in module.bottleneck for n in names):
            return module
        module = module.base_layer
    return None


def _bottleneck_sites(model: nn.Module) -> dict[str, list[str]]:
    """Bottleneck adapter name -> the (user) module names that hold it."""
    sites: dict[str, list[str]] = {}
    for name, module in plain_modules(model):
        while isinstance(module, DeltaLayer):
            if isinstance(module, _BottleneckLayer):
                for adapter in module.bottleneck:
                    sites.setdefault(adapter, []).append(name)
            module = module.base_layer
    return sites


def _check_adapters_present(model: nn.Module, config: FusionConfig) -> None:
    if len(config.adapters) < 2:
        raise ConfigError(
            "FusionConfig(adapters=[...]) must name two or more bottleneck adapters already on the model, "
            f"got {config.adapters}."
        )
    sites = _bottleneck_sites(model)
    missing = [n for n in config.adapters if n not in sites]
    if missing:
        raise ConfigError(
            f"The fusion needs bottleneck adapters {missing}, which this model does not have "
            f"(its bottleneck adapters: {sorted(sites) or 'none'}). Add or load them first "
            f"(model.load_adapter(path, name)), or load a fusion saved with its adapters with "
            f"deltatune.methods.adapters.fusion.load_fusion()."
        )


def _fusion_sites(model: nn.Module, config: FusionConfig) -> list[tuple[str, _BottleneckLayer]]:
    """(module name, bottleneck layer) for each targeted module holding all fused adapters."""
    holding = {}
    for name, module in plain_modules(model):
        layer = _adapter_layer_holding(module, config.adapters)
        if name and layer is not None:
            holding[name] = layer
    if not holding:
        where = "; ".join(f"{a} on {len(s)} modules, e.g. {s[0]}" for a, s in _bottleneck_sites(model).items() if a in config.adapters)
        raise ConfigError(
            f"No module holds all of the adapters {config.adapters} ({where}). A fusion needs them on the same "
            f"modules: train them with the same placement and target_modules."
        )
    every_site = "|".join(re.escape(name) for name in holding)
    try:
        names = find_targets(model, config, fallback=every_site)
    except ConfigError:
        if config.target_modules is not None:
            raise
        raise ConfigError(
            f"layers_to_transform / exclude_modules leave none of the modules that hold all of {config.adapters}: "
            f"{_some(sorted(holding))}."
        ) from None
    lacking = [n for n in names if n not in holding]
    if lacking:
        raise ConfigError(
            f"target_modules selects {len(lacking)} module(s) that do not hold all of {config.adapters}, e.g. "
            f"{lacking[:3]}. Modules that do: {_some(sorted(holding))}."
        )
    return [(name, holding[name]) for name in names]


def _some(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _fusion_layer_for(model: nn.Module, name: str, adapter_layer: _BottleneckLayer) -> FusionLayer:
    """The FusionLayer right around `adapter_layer` (made and put in place if there is none)."""
    module = model.get_submodule(name)
    if module is adapter_layer:
        fusion_layer = FusionLayer(adapter_layer)
        set_submodule(model, name, fusion_layer)
        return fusion_layer
    # Another wrapper (another method added later, or an earlier fusion) sits around the layer.
    holder = module
    while holder.base_layer is not adapter_layer:
        holder = holder.base_layer
    if isinstance(holder, FusionLayer):
        return holder
    fusion_layer = FusionLayer(adapter_layer)
    holder.base_layer = fusion_layer
    return fusion_layer


def attach(model: nn.Module, config: FusionConfig, adapter_name: str, **_: object) -> None:
    _check_adapters_present(model, config)
    # Every site is found before any is wrapped, so a bad config leaves the model untouched.
    for name, adapter_layer in _fusion_sites(model, config):
        _fusion_layer_for(model, name, adapter_layer).add_adapter(adapter_name, config, name)


def value_regularization_loss(model: DeltaModel, adapter_name: str, config: FusionConfig) -> torch.Tensor:
    """λ·Σ_sites ‖V − I‖²_F for one fusion (the training loop adds it to the task loss)."""
    drifts = [
        layer.fusion[adapter_name].value_drift()
        for _, layer in model.delta_layers()
        if isinstance(layer, FusionLayer) and adapter_name in layer.fusion
    ]
    return config.value_regularization * torch.stack(drifts).sum()


# -- files: a fusion together with its adapters --------------------------------------------------
def save_fusion(model: DeltaModel, directory: str | Path, fusion_name: str) -> Path:
    """Write the fusion to directory/fusion/ and each adapter it fuses to directory/adapters/<name>/
    (safetensors + JSON, as model.save writes them); load_fusion reads it back."""
    fusions = {name: config for name, config in model.configs.items() if isinstance(config, FusionConfig)}
    if fusion_name not in fusions:
        raise ValueError(f"{fusion_name!r} is not a fusion on this model; its fusions: {sorted(fusions) or 'none'}.")
    config = fusions[fusion_name]
    directory = Path(directory)
    for adapter in config.adapters:
        model.save(directory / ADAPTERS_FOLDER / adapter, adapter)
    model.save(directory / FUSION_FOLDER, fusion_name)
    return directory


def load_fusion(
    model: nn.Module, directory: str | Path, fusion_name: str = "fusion", is_trainable: bool = False
) -> DeltaModel:
    """Add a fusion written by save_fusion, and the adapters it fuses (under their saved names,
    frozen), to `model` (a base model or a DeltaModel); the fusion becomes the active adapter."""
    directory = Path(directory)
    adapters = _saved_fused_adapters(directory)
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model)
    taken = [n for n in [*adapters, fusion_name] if n in wrapped.configs]
    if taken:
        raise ValueError(
            f"The model already has adapters named {taken}. load_fusion adds the fused adapters itself: delete "
            f"them first, pick another fusion_name, or load only the fusion with "
            f"model.load_adapter({str(directory / FUSION_FOLDER)!r}, name)."
        )
    loaded: list[str] = []
    try:
        for adapter in adapters:
            wrapped.load_adapter(directory / ADAPTERS_FOLDER / adapter, adapter, activate=False)
            loaded.append(adapter)
        wrapped.load_adapter(directory / FUSION_FOLDER, fusion_name, is_trainable=is_trainable)
    except Exception:
        for adapter in reversed(loaded):  # leave the model as it was given
            wrapped.delete_adapter(adapter)
        raise
    return wrapped


def _saved_fused_adapters(directory: Path) -> list[str]:
    """The adapter names a saved fusion's config lists, after checking the folder layout."""
    values = read_config_dict(directory / FUSION_FOLDER)
    if str(values["peft_type"]).upper() != FusionConfig.peft_type:
        raise AdapterFileError(
            f"{directory / FUSION_FOLDER} holds a {values['peft_type']} adapter, not a fusion; "
            f"point load_fusion to a folder written by save_fusion."
        )
    adapters = list(values.get("adapters") or [])
    absent = [n for n in adapters if not (directory / ADAPTERS_FOLDER / n).is_dir()]
    if absent:
        raise AdapterFileError(
            f"{directory} lacks the fused adapters {absent} (expected in {directory / ADAPTERS_FOLDER}/<name>/). "
            f"If the model already has them, load only the fusion with model.load_adapter({str(directory / FUSION_FOLDER)!r}, name)."
        )
    return adapters


register_method(
    MethodInfo(
        name="fusion",
        config_class=FusionConfig,
        attach=attach,
        kind="additive",
        description="AdapterFusion: attention over trained bottleneck adapters, only the fusion trains",
        mergeable=False,
        compare_defaults={"lr": 1e-3},
        auxiliary_loss=value_regularization_loss,
        standalone=False,
    )
)
