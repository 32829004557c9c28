"""Method registry: a method's name -> its config class and how to attach it to a model.

Methods register themselves when `deltatune.methods` is imported; the core never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import AdapterConfig, ConfigError, _closest

# attach(model, config, adapter_name, **build_kwargs) -> None: adds one adapter to `model` in place.
Attach = Callable[..., None]


@dataclass(frozen=True)
class MethodInfo:
    """What the core and the comparison job need to know about a method.

    kind: "additive" (new modules), "reparameterized" (a delta of existing weights, e.g. LoRA),
        "selective" (train chosen existing entries), or "soft-prompt".
    mergeable: whether the delta can be folded into the base weights.
    merges_sharded: whether its merge also runs on FSDP2-sharded weights, in place on each rank's
        shard (tested for the method with 2 processes, tests/test_distributed.py).
    compare_defaults: config fields the comparison job uses for this method, plus "lr".
    needs_calibration_data: the method must see batches before it can be built (e.g. a
        Fisher mask); `dt.wrap(..., calibration_data=...)` passes them to `attach`.
    after_step: called as after_step(delta_model, adapter_name, config, step) after each optimizer
        step while the adapter trains (e.g. AdaLoRA's rank budget); the training loop reaches
        it through DeltaModel.after_optimizer_step without knowing the method.
    auxiliary_loss: auxiliary_loss(delta_model, adapter_name, config) -> scalar tensor added to the
        task loss (e.g. AdaLoRA's orthogonality penalty), through DeltaModel.auxiliary_loss.
    standalone: False for methods built on other trained adapters (AdapterFusion), which the
        comparison job cannot train from a bare base model.
    fused_kernels: the method gains from the fused training path (kernels/patch.py); with the
        wrapper's fused="auto" a CUDA model carrying such an adapter is patched.
    combine: combine(delta_model, adapters, weights, adapter_name, combination, **options) adds a
        weighted combination of this method's adapters as a new adapter (LoRA's linear/cat/svd/
        TIES/DARE), through DeltaModel.add_weighted_adapter; None if its adapters do not combine.
    run_length_field: a config field that a training run fills with its number of optimizer
        steps when the user leaves it unset (AdaLoRA's total_step, which schedules the rank budget).
    base_quant_field: a config field naming the 4-bit type the method stores its base in itself
        (QLoRA's quant_type); a job asked for a 4-bit base sets it instead of quantizing first.
    search_space: search_space(trial) -> {config field: value}, the method's own hyper-parameters
        for `deltatune tune` (trial.suggest_int / suggest_float / suggest_categorical; the learning
        rate is searched for every method around compare_defaults["lr"]). None: the rate only.
    resolve_targets: resolve_targets(delta_model, adapter_name, config) -> config, called once the
        adapter is attached: the config with the defaults it resolved written out (target_modules as
        the modules it wrapped), so that its file means the same to every reader (peft reads a
        missing target_modules as its own default, which differs from ours).
    """

    name: str
    config_class: type[AdapterConfig]
    attach: Attach
    kind: str
    description: str
    mergeable: bool = True
    merges_sharded: bool = False
    compare_defaults: dict[str, Any] = field(default_factory=dict)
    needs_calibration_data: bool = False
    after_step: Callable[..., None] | None = None
    auxiliary_loss: Callable[..., Any] | None = None
    standalone: bool = True
    fused_kernels: bool = False
    combine: Callable[..., Any] | None = None
    run_length_field: str | None = None
    base_quant_field: str | None = None
    resolve_targets: Callable[..., Any] | None = None
    search_space: Callable[[Any], dict[str, Any]] | None = None


_METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    if info.name in _METHODS and _METHODS[info.name].config_class is not info.config_class:
        raise ValueError(f"Method name {info.name!r} is already registered by {_METHODS[info.name].config_class}")
    _METHODS[info.name] = info
    return info


def available_methods() -> list[str]:
    return sorted(_METHODS)


def method_info(name: str) -> MethodInfo:
    key = name.lower()
    if key not in _METHODS:
        raise ValueError(
            f"Unknown method {name!r}.{_closest(key, available_methods())} "
            f"Available: {', '.join(available_methods())}."
        )
    return _METHODS[key]


def combining_methods() -> list[MethodInfo]:
    """The methods whose adapters combine (MethodInfo.combine)."""
    return [info for info in _METHODS.values() if info.combine is not None]


def method_for_config(config: AdapterConfig) -> MethodInfo:
    for info in _METHODS.values():
        if type(config) is info.config_class:
            return info
    return method_info(config.method)


def method_for_peft_type(peft_type: str) -> MethodInfo:
    """Find the method for a config file's peft_type (ours or peft's spelling)."""
    wanted = peft_type.upper()
    matches = [info for info in _METHODS.values() if (info.config_class.peft_type or info.name.upper()) == wanted]
    if matches:
        # Several methods may write one file type (QLoRA writes LoRA files): the file is read by the
        # most general one, whose config class the others extend, whatever the registration order.
        return min(matches, key=lambda info: len(info.config_class.__mro__))
    raise ConfigError(
        f"The adapter file is for method {peft_type!r}, which deltatune does not provide. "
        f"Available: {', '.join(available_methods())}."
    )


def make_config(name: str, **fields: Any) -> AdapterConfig:
    """Build a method's config by name; unknown fields are an error listing the valid ones."""
    return method_info(name).config_class.from_dict(fields)
