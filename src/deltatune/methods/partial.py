"""Partial fine-tuning: train chosen blocks (by default the last k) and/or the head in full.

The classic baseline between PEFT and full fine-tuning. Each chosen module gets a trainable copy
per adapter, exactly like modules_to_save, and forward runs the copy. A copy costs what a delta
of the same tensors would (the blocks' size again, beside the frozen original), but forward runs
the block's own code on plain weights, with no base + delta tensors built every step, and the
base stays intact so adapters can be switched off, swapped and merged exactly (merge swaps the
trained weights in). The file stores the chosen modules' tensors under their own names.

Blocks are the numbered children of a block list (model.layers.N, transformer.h.N,
encoder.layer.N, ...); a model with several stacks (T5's encoder and decoder) trains the last k
of each. Other methods added later skip the copied blocks: add partial fine-tuning first in a hybrid.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from ..config import AdapterConfig, ConfigError
from ..hf_compat import BLOCK_CONTAINERS
from ..inject import find_targets, output_head_names, set_submodule
from ..layer import DeltaLayer, ModulesToSave
from ..registry import MethodInfo, register_method


@dataclass
class PartialConfig(AdapterConfig):
    """last_k_layers: train the last k blocks of each block stack (0: none);
    layers_to_transform: block indices to train instead of the last k;
    target_modules: train exactly these modules instead of whole blocks;
    train_head: train the output head (lm_head, classifier) too, unless modules_to_save holds it."""

    method = "partial"
    peft_type = "PARTIAL"

    last_k_layers: int = 2
    train_head: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.last_k_layers, int) or self.last_k_layers < 0:
            raise ConfigError(f"last_k_layers must be an integer >= 0, got {self.last_k_layers!r}.")


class PartialLayer(ModulesToSave):
    """A module trained in full for a partial fine-tuning adapter (a trainable copy per adapter).

    A ModulesToSave, so the parameter report counts the model once: the copies stand in for the
    originals. Its own class, so the report can name the method (see the report of issue 3).
    """

    # A whole block takes per-row arguments (masks, caches) beside its input: no per-row routing.
    supports_mixed_batch = False


def find_blocks(model: nn.Module, layers_pattern: list[str] | str | None = None) -> dict[str, list[str]]:
    """Block names by block list, in order: {"model.layers": ["model.layers.0", ...]}."""
    containers = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or list(BLOCK_CONTAINERS))
    pattern = re.compile(rf"(.*\.)?(?:{'|'.join(re.escape(c) for c in containers)})\.\d+")
    stacks: dict[str, list[str]] = defaultdict(list)
    for name, _ in model.named_modules():
        # The outermost match only: T5's block.N.layer.M are parts of block N, not blocks.
        if pattern.fullmatch(name) and not any(name.startswith(b + ".") for s in stacks.values() for b in s):
            stacks[name.rsplit(".", 1)[0]].append(name)
    return {stack: sorted(names, key=lambda n: int(n.rsplit(".", 1)[1])) for stack, names in stacks.items()}


def chosen_modules(model: nn.Module, config: PartialConfig) -> list[str]:
    if config.target_modules is not None:
        names = find_targets(model, config)
    else:
        stacks = find_blocks(model, config.layers_pattern)
        if not stacks and (config.last_k_layers or config.layers_to_transform):
            raise ConfigError(
                f"Found no numbered blocks (e.g. model.layers.0) in {type(model).__name__}; name the modules to "
                "train with target_modules, or set layers_pattern to the name of its block list."
            )
        names = []
        for blocks in stacks.values():
            if config.layers_to_transform is not None:
                names += [b for b in blocks if int(b.rsplit(".", 1)[1]) in config.layers_to_transform]
            elif config.last_k_layers:
                names += blocks[-config.last_k_layers:]
    if config.train_head:
        kept_elsewhere = set(config.modules_to_save or [])
        present = {n for n, _ in model.named_modules()}
        heads = sorted(h for h in output_head_names(model) if h in present and h not in kept_elsewhere)
        names += [h for h in heads if h not in names]
    if not names:
        raise ConfigError("Partial fine-tuning was given nothing to train: set last_k_layers > 0, layers_to_transform, target_modules or train_head=True.")
    return names


def attach(model: nn.Module, config: PartialConfig, adapter_name: str, **_: object) -> None:
    names = chosen_modules(model, config)
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        inner = module.get_base_layer() if isinstance(module, PartialLayer) else module
        if any(isinstance(m, DeltaLayer) for m in inner.modules()):
            raise ConfigError(
                f"Module {name!r} already holds adapters of another method, which a full copy would duplicate; "
                "add the partial fine-tuning adapter first, then the others (they then skip the trained blocks)."
            )
    for name, module in modules.items():
        if not isinstance(module, PartialLayer):
            module = PartialLayer(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config, name)


register_method(
    MethodInfo(
        name="partial",
        config_class=PartialConfig,
        attach=attach,
        kind="selective",
        description="Train chosen blocks (by default the last k) and/or the head in full; the base stays intact",
        compare_defaults={"last_k_layers": 2, "lr": 1e-4},
    )
)
