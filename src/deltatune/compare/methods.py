"""Turn a method name into a trainable model, the same way for compare, estimate and train.

"full" (full fine-tuning) is handled here, as the comparison's baseline: every parameter
trainable, no wrapper. Every other name goes through the registry, so a method registered by
anyone shows up in the comparison without changes here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from torch import nn

from .presets import DEFAULT_PEFT_LEARNING_RATE, FALLBACK_LEARNING_RATES, FULL

# Where the comparison departs from a method's registered compare_defaults, and why.
COMPARE_OVERRIDES: dict[str, dict[str, Any]] = {
    # Rank 4 on every encoder linear keeps LoRA under 1% of MiniLM's parameters (rank 8: 1.4%)
    # at the same scale alpha / r = 2.
    "lora": {"r": 4, "lora_alpha": 8},
    "qlora": {"r": 4, "lora_alpha": 8},  # same adapter as the lora row, over a 4-bit base
}


def available_compare_methods() -> list[str]:
    """Full fine-tuning plus every registered PEFT method."""
    import deltatune

    return [FULL, *deltatune.available_methods()]


def validate_methods(names: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicated method names; an unknown one is an error listing the valid ones."""
    available = available_compare_methods()
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown method {raw!r}.{hint} Available methods: {', '.join(available)}.")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"No method selected. Available methods: {', '.join(available)}.")
    return chosen


@dataclass
class MethodSettings:
    """What one method is trained with in a comparison: learning rate and config fields."""

    name: str
    lr: float
    config_fields: dict[str, Any] = field(default_factory=dict)
    kind: str = "full"
    description: str = "all parameters trained, no adapter"
    needs_calibration_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "config": dict(self.config_fields),
            "kind": self.kind,
            "description": self.description,
        }


def method_settings(
    name: str,
    config_overrides: dict[str, Any] | None = None,
    lr: float | None = None,
    *,
    use_compare_overrides: bool = True,
) -> MethodSettings:
    """Settings for `name`: registered compare_defaults, then COMPARE_OVERRIDES, then the caller's."""
    if name == FULL:
        if config_overrides:
            raise ValueError(f"Full fine-tuning takes no method options, got {sorted(config_overrides)}.")
        return MethodSettings(FULL, lr if lr is not None else FALLBACK_LEARNING_RATES[FULL])
    import deltatune

    info = deltatune.method_info(name)
    fields = dict(getattr(info, "compare_defaults", None) or {})
    registered_lr = fields.pop("lr", None)
    if use_compare_overrides:
        fields.update(COMPARE_OVERRIDES.get(name, {}))
    fields.update(config_overrides or {})
    if lr is None:
        lr = registered_lr if registered_lr is not None else FALLBACK_LEARNING_RATES.get(name, DEFAULT_PEFT_LEARNING_RATE)
    # Building the config now turns a bad field into an error before any training starts.
    deltatune.make_config(name, **fields)
    return MethodSettings(
        name=name,
        lr=float(lr),
        config_fields=fields,
        kind=info.kind,
        description=info.description,
        needs_calibration_data=bool(getattr(info, "needs_calibration_data", False)),
    )


def apply_method(
    model: nn.Module,
    settings: MethodSettings,
    head_modules: Sequence[str] = (),
    calibration_data: Iterable[Any] | None = None,
) -> nn.Module:
    """Make `model` trainable the way `settings` says; returns the module to train."""
    if settings.name == FULL:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import deltatune

    fields = dict(settings.config_fields)
    # A fresh classification head must be trained for any method to work on the task.
    if head_modules and fields.get("modules_to_save") is None:
        fields["modules_to_save"] = list(head_modules)
    config = deltatune.make_config(settings.name, **fields)
    if settings.needs_calibration_data:
        if calibration_data is None:
            raise ValueError(f"Method {settings.name!r} needs calibration batches; pass calibration_data.")
        return deltatune.wrap(model, config, calibration_data=calibration_data)
    return deltatune.wrap(model, config)
