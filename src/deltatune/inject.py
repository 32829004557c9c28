"""Find target modules in any nn.Module tree and wrap them.

One routine serves every layer-based method: match names (exact, dotted suffix, regex), module
types, block indices; skip excluded names; wrap each match with the method's layer class, or add
the adapter to a wrapper of that class that is already there.
"""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable

from torch import nn

from . import hf_compat
from .config import AdapterConfig, ConfigError
from .hf_compat import BLOCK_CONTAINERS
from .layer import DeltaLayer, ModulesToSave


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' GPT-2 Conv1D or a 4-bit QuantLinear, also inside one of our wrappers."""
    if isinstance(module, DeltaLayer):
        module = module.get_base_layer()
    return hf_compat.is_linear_like(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) producing the model's final output, never targeted by default."""
    names = {"lm_head", "classifier", "score", "cls", "qa_outputs"}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def default_targets(model: nn.Module) -> list[str] | str:
    """The architecture's attention and MLP projections (hf_compat's table), else every linear
    layer but the head."""
    arch = hf_compat.architecture(model)
    return list(arch.linear_targets) if arch and arch.linear_targets else "all-linear"


def _name_matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def block_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    containers = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or BLOCK_CONTAINERS)
    for container in containers:
        match = re.search(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def _is_target(name: str, module: nn.Module, config: AdapterConfig, targets: list[str] | str, heads: set[str]) -> bool:
    if targets == "all-linear":
        hit = is_linear_like(module) and not any(name == h or name.endswith("." + h) for h in heads)
    else:
        hit = _name_matches(name, targets)
    if not hit and config.target_types:
        hit = type(module).__name__ in config.target_types
    if not hit:
        return False
    if config.exclude_modules and _name_matches(name, config.exclude_modules):
        return False
    if config.layers_to_transform is not None:
        return block_index(name, config.layers_pattern) in config.layers_to_transform
    return True


def plain_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Module names as the user knows them: the inside of our wrappers is not a target.

    A wrapper itself is yielded under the name of the module it wraps; call get_base_layer()
    on it for that module."""
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, DeltaLayer):
            skip_prefixes.append(name + ".")
        yield name, module


def find_targets(
    model: nn.Module, config: AdapterConfig, fallback: list[str] | str | None = None
) -> list[str]:
    """Names of the modules this config targets; an error naming close matches if none match."""
    targets = config.target_modules if config.target_modules is not None else (fallback or default_targets(model))
    heads = output_head_names(model)
    found = [name for name, module in plain_modules(model) if name and _is_target(name, module, config, targets, heads)]
    if not found:
        raise ConfigError(_no_match_message(model, config, targets))
    return found


def _no_match_message(model: nn.Module, config: AdapterConfig, targets: list[str] | str) -> str:
    names = [n for n, _ in plain_modules(model) if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    hints = sorted({c for w in wanted for c in difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.4)})
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" (restricted to blocks {config.layers_to_transform})"
    return (
        f"target_modules={targets!r}{extra} matches no module of {type(model).__name__}. "
        + (f"Closest module names: {', '.join(hints)}. " if hints else "")
        + f"Module names in this model include: {', '.join(leaves[:25])}."
    )


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


LayerChooser = Callable[[nn.Module], "type[DeltaLayer] | None"]


def inject_layers(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    layer_for: "type[DeltaLayer] | LayerChooser",
    fallback_targets: list[str] | str | None = None,
) -> list[str]:
    """Wrap every target with its layer class (or extend a wrapper of that class already there).

    `layer_for` is a DeltaLayer subclass, or a function from the (unwrapped) target module to
    the class that handles it, returning None for module types the method cannot wrap.
    """
    names = find_targets(model, config, fallback_targets)
    plan = []
    for name in names:
        module = model.get_submodule(name)
        inner = module.get_base_layer() if isinstance(module, DeltaLayer) else module
        layer_class = layer_for if isinstance(layer_for, type) else layer_for(inner)
        if layer_class is None:
            raise ConfigError(
                f"Module {name!r} is a {type(inner).__name__}, which this method cannot wrap. "
                f"Leave it out of target_modules or add it to exclude_modules."
            )
        plan.append((name, module, layer_class))
    # Checked all targets before changing any, so a bad target leaves the model untouched.
    for name, module, layer_class in plan:
        if not isinstance(module, layer_class):
            module = layer_class(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config, name)
    return names


def layer_attach(layer_for: "type[DeltaLayer] | LayerChooser"):
    """The `attach` function of a method that wraps target layers at the default targets (most methods)."""

    def attach(model: nn.Module, config: AdapterConfig, adapter_name: str, **_: object) -> None:
        inject_layers(model, config, adapter_name, layer_for)

    return attach


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Give each named module a trainable copy for this adapter (names match as suffixes)."""
    for wanted in names:
        matches = [n for n, m in plain_modules(model) if n and (n == wanted or n.endswith("." + wanted))]
        if not matches:
            raise ConfigError(_no_match_message(model, AdapterConfig(), [wanted]).replace("target_modules", "modules_to_save"))
        for name in matches:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(model, name, module)
            module.add_adapter(adapter_name)
