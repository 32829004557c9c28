"""QLoRA (Dettmers et al. 2023): LoRA trained over a frozen base whose linear layers are 4-bit.

Attaching quantizes the base's linear layers (all but the output head and modules_to_save, or
only LoRA's targets) with deltatune.quant, then attaches plain LoRA through the registry. The
adapter is plain LoRA: it is saved as a LoRA file (peft_type "LORA", LoRA's keys and fields), so it
loads on the full-precision base, in peft, or on a base quantized with deltatune.quant.quantize.
Merging into 4 bits is never silent: see deltatune.quant.merge_quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ...config import ConfigError
from ...inject import find_targets
from ...quant import QUANT_TYPES, quantize, quantized_layers
from ...model import written_out_targets
from ...registry import MethodInfo, register_method
from . import LoraConfig, attach_lora
_COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA's fields, plus how the base is stored:

    quant_type: "nf4" (QLoRA's type), "fp4" or "int4"; block_size: values per absmax constant;
    double_quant: store the constants in 8 bits (≈0.127 instead of 0.5 bits per weight);
    compute_dtype: "auto" (the input's dtype / autocast), "bfloat16", "float16" or "float32";
    quantize_all_linear: True quantizes every linear layer but the output head and
    modules_to_save (the QLoRA setup); False only the layers LoRA targets.
    """

    method = "qlora"
    peft_type = "LORA"  # saved files are LoRA files

    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"
    quantize_all_linear: bool = True

    def validate(self) -> None:
        super().validate()
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}.")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
            raise ConfigError(f"block_size must be a positive even integer (QLoRA uses 64), got {self.block_size!r}.")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(_COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")
        if self.init_lora_weights == "pissa":
            raise ConfigError("PiSSA init rewrites the base weight, which QLoRA keeps in 4 bits; use init_lora_weights=True.")

    def lora_config(self) -> LoraConfig:
        """The same adapter as a plain LoraConfig (what is saved)."""
        names = {f.name for f in fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in vars(self).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        # A plain LoRA file: peft and a full-precision base read it; quantization is the base's business.
        return self.lora_config().to_dict()


def _quant_exclusions(config: QLoraConfig) -> list[str] | None:
    return list(config.modules_to_save) if config.modules_to_save else None


def attach_qlora(model: nn.Module, config: QLoraConfig, adapter_name: str, **_: object) -> None:
    """Quantize the base's linear layers, then attach LoRA on the chosen targets."""
    existing = {layer.quant_type for _, layer in quantized_layers(model)}
    if existing - {config.quant_type}:
        raise ConfigError(f"The base is already quantized as {sorted(existing)}, not {config.quant_type!r}; use that quant_type.")
    # LoRA's targets are resolved before quantizing: "all-linear" selects nn.Linear layers by type.
    lora_targets = find_targets(model, config)
    quantize(
        model, config.quant_type, None if config.quantize_all_linear else lora_targets,
        exclude_modules=_quant_exclusions(config), block_size=config.block_size, double_quant=config.double_quant,
        compute_dtype=_COMPUTE_DTYPES[config.compute_dtype],
    )
    attach_lora(model, config.replace(target_modules=lora_targets), adapter_name)


register_method(
    MethodInfo(
        name="qlora",
        config_class=QLoraConfig,
        attach=attach_qlora,
        kind="reparameterized",
        description="LoRA over a frozen 4-bit NF4 base with double-quantized constants (QLoRA)",
        # model.merge() refuses with a pointer to deltatune.quant.merge_quantized, which makes the
        # caller choose between a full-precision result and a re-quantized one with its error reported.
        mergeable=True,
        # Rank 4 on every encoder linear keeps LoRA under 1% of MiniLM's parameters (rank 8: 1.4%),
        # at alpha / r = 2; QLoRA trains the same adapter over a 4-bit base.
        compare_defaults={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lr": 1e-3},
        fused_kernels=True,
        base_quant_field="quant_type",
        resolve_targets=written_out_targets,
    )
)
