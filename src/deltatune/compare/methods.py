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

def available_compare_methods() -> list[str]:
    """Full fine-tuning plus every registered PEFT method that trains on a bare base model."""
    import deltatune

    return [FULL, *(name for name in deltatune.available_methods() if deltatune.method_info(name).standalone)]


def validate_methods(names: Iterable[str]) -> list[str]:
    """Lower-case, de-duplicated method names; an unknown one is an error listing the valid ones."""
    available = available_compare_methods()
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in available:
            import deltatune

            if name in deltatune.available_methods():
                raise ValueError(
                    f"Method {name!r} builds on other trained adapters, so it cannot be trained from a bare base "
                    f"model in a comparison; train it with the Python API. Available methods: {', '.join(available)}."
                )
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
    quantize: str | None = None  # 4-bit type of the frozen base ("nf4", "fp4", "int4"), or None
    quantizes_itself: bool = False  # the method stores its base in 4 bits itself (MethodInfo.base_quant_field)
    lr_auto: bool = False  # lr comes from a learning-rate range test just before training (--lr auto)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "config": dict(self.config_fields),
            "kind": self.kind,
            "description": self.description,
            "quantize": self.quantize,
            **({"lr_auto": True} if self.lr_auto else {}),
        }


def method_settings(
    name: str,
    config_overrides: dict[str, Any] | None = None,
    lr: float | None = None,
    *,
    quantize: str | None = None,
    quantize_full: str = "error",
) -> MethodSettings:
    """Settings for `name`: registered compare_defaults, then the caller's.

    quantize: store the frozen base in 4 bits ("nf4", "fp4", "int4") under the method. Full
    fine-tuning trains every weight and so cannot use a 4-bit base: with quantize_full="error" that
    is an error, with "keep" the full row stays in full precision (the comparison's baseline).
    """
    quantize = _check_quantize(quantize)
    if name == FULL:
        if config_overrides:
            raise ValueError(f"Full fine-tuning takes no method options, got {sorted(config_overrides)}.")
        if quantize and quantize_full == "error":
            raise ValueError(
                f"Full fine-tuning trains every weight, so it cannot train a {quantize} (4-bit) base; "
                "drop --quantize or choose a PEFT method (e.g. qlora or lora)."
            )
        return MethodSettings(FULL, lr if lr is not None else FALLBACK_LEARNING_RATES[FULL])
    import deltatune

    info = deltatune.method_info(name)
    fields = dict(getattr(info, "compare_defaults", None) or {})
    registered_lr = fields.pop("lr", None)
    if quantize and info.base_quant_field:
        fields[info.base_quant_field] = quantize  # a method that quantizes its base itself (qlora)
    fields.update(config_overrides or {})
    if lr is None:
        lr = registered_lr if registered_lr is not None else FALLBACK_LEARNING_RATES.get(name, DEFAULT_PEFT_LEARNING_RATE)
    # Building the config now turns a bad field into an error before any training starts.
    config = deltatune.make_config(name, **fields)
    if info.base_quant_field:  # the method quantizes its base itself (qlora), in the config's type
        quantize = getattr(config, info.base_quant_field) or quantize
    return MethodSettings(
        name=name,
        lr=float(lr),
        config_fields=fields,
        kind=info.kind,
        description=info.description,
        needs_calibration_data=bool(getattr(info, "needs_calibration_data", False)),
        quantize=quantize,
        quantizes_itself=bool(info.base_quant_field),
    )


def _check_quantize(quantize: str | None) -> str | None:
    if quantize is None or quantize in ("", "none", "no"):
        return None
    from deltatune.quant import QUANT_TYPES

    value = quantize.strip().lower()
    if value not in QUANT_TYPES:
        raise ValueError(f"Unknown 4-bit type {quantize!r} for --quantize; choose one of {', '.join(QUANT_TYPES)}.")
    return value


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
    if settings.quantize and not settings.quantizes_itself:
        from deltatune.quant import quantize

        # Every linear layer but the output head and the freshly trained task head, as QLoRA does.
        quantize(model, settings.quantize, exclude_modules=list(head_modules) or None)
    if settings.needs_calibration_data:
        if calibration_data is None:
            raise ValueError(f"Method {settings.name!r} needs calibration batches; pass calibration_data.")
        return deltatune.wrap(model, config, calibration_data=calibration_data)
    return deltatune.wrap(model, config)
