"""Merging adapters into a 4-bit base, by an explicit choice and with the error it costs reported.

A LoRA delta cannot be added to 4-bit codes: the sum must be rounded to the 4-bit grid again,
which changes the model. So there are two honest ways out, and `merge_quantized` makes the caller
pick one:

* "dequantize": every 4-bit layer becomes a full-precision nn.Linear holding exactly the weight
  the adapter was trained against, and the adapter is merged into it. Outputs are unchanged (to
  float rounding); the model is as big as a full-precision one.
* "requantize": as above, then each merged layer goes back to 4 bits in its old format. The model
  stays small, but rounding the merged weight changes the outputs; the report says by how much,
  measured on the caller's sample inputs (required for that reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

from ..inject import set_submodule
from ..registry import method_for_config
from .formats import quantize, relative_error
from .linear import QuantLinear, quantized_layers

MergeMode = Literal["dequantize", "requantize"]


@dataclass
class MergeReport:
    """What merging did. output_error: ‖merged(x) − unmerged(x)‖ / ‖unmerged(x)‖ on the samples."""

    mode: str
    layers: int  # layers now full precision ("dequantize") or re-quantized ("requantize")
    output_error: float | None
    weight_error: float | None = None  # mean relative Frobenius error of re-quantized merged weights
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        parts = [f"merge ({self.mode}): {self.layers} quantized layers {'re-quantized' if self.mode == 'requantize' else 'now full precision'}"]
        if self.output_error is not None:
            parts.append(f"relative output error {self.output_error:.3e} on the sample inputs")
        if self.weight_error is not None:
            parts.append(f"mean weight re-quantization error {self.weight_error:.3e}")
        parts.append(f"weights {_size(self.bytes_before)} -> {_size(self.bytes_after)}")
        return "; ".join(parts)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _as_batches(sample_inputs: Any) -> list[Any]:
    if sample_inputs is None:
        return []
    if isinstance(sample_inputs, (torch.Tensor, dict)):
        return [sample_inputs]
    return list(sample_inputs)


def _outputs(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    results = []
    with torch.no_grad():
        for batch in batches:
            out = model(**batch) if isinstance(batch, dict) else model(batch)
            out = getattr(out, "logits", out)
            if isinstance(out, (tuple, list)):
                out = out[0]
            results.append(out.detach().float().clone())
    return results


def _output_error(reference: list[torch.Tensor], current: list[torch.Tensor]) -> float | None:
    if not reference:
        return None
    num = sum(((c - r).double().norm() ** 2).item() for r, c in zip(reference, current))
    den = sum((r.double().norm() ** 2).item() for r in reference)
    return (num / max(den, 1e-300)) ** 0.5


def _weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def merge_quantized(
    model: nn.Module,
    mode: MergeMode | None = None,
    sample_inputs: Any = None,
    adapter_names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, MergeReport]:
    """Merge the adapters of a wrapped model whose base has 4-bit layers; returns (plain model, report).

    mode: "dequantize" (full-precision merged model, outputs unchanged) or "requantize" (4-bit
        merged model; its output error on `sample_inputs` is measured and reported).
    sample_inputs: a batch (dict of model kwargs, or a tensor) or a list of them; required for
        "requantize", optional for "dequantize" (then the report checks the merge is exact).
    dtype: dtype of the dequantized weights (default: the dtype the layer was quantized from).
    """
    from ..model import DeltaModel

    if mode not in ("dequantize", "requantize"):
        raise ValueError(
            'Choose how to merge into a 4-bit base: mode="dequantize" (full-precision model, exact) or '
            'mode="requantize" (stays 4-bit; the output error is measured on sample_inputs and reported).'
        )
    if not isinstance(model, DeltaModel):
        raise TypeError("merge_quantized takes the wrapped model (from dt.wrap / dt.load) whose adapters it merges.")
    names = list(adapter_names) if adapter_names is not None else list(model.active_adapters)
    unknown = [n for n in names if n not in model.configs]
    if unknown:
        raise ValueError(f"No adapter named {unknown}; this model has {model.adapter_names}.")
    unmergeable = [n for n in names if not method_for_config(model.configs[n]).mergeable]
    if unmergeable:
        raise TypeError(f"Adapters {unmergeable} cannot be merged into base weights (they run beside the base layers).")
    batches = _as_batches(sample_inputs)
    if mode == "requantize" and not batches:
        raise ValueError("mode='requantize' changes the outputs; pass sample_inputs (a batch of model inputs) so the error can be reported.")
    reference = _outputs(model, batches)
    bytes_before = _weight_bytes(model)
    formats = _dequantize_all(model.model, dtype)
    if not formats:
        raise ValueError("This model has no quantized layers; use model.merge_and_unload() instead.")
    merged = model.merge_and_unload(names)
    weight_error, changed = _requantize(merged, formats, dtype) if mode == "requantize" else (None, len(formats))
    report = MergeReport(
        mode=mode, layers=changed, output_error=_output_error(reference, _outputs(merged, batches)),
        weight_error=weight_error, bytes_before=bytes_before, bytes_after=_weight_bytes(merged),
    )
    return merged, report


def _dequantize_all(model: nn.Module, dtype: torch.dtype | None) -> dict[str, QuantLinear]:
    """Swap every QuantLinear (adapter-wrapped or not) for an nn.Linear; returns the originals by
    the name the plain layer will have once adapters are unloaded."""
    originals: dict[str, QuantLinear] = {}
    for name, layer in quantized_layers(model):
        set_submodule(model, name, layer.to_linear(dtype))
        # "x.q_proj.base_layer" is "x.q_proj" after merge_and_unload drops the wrapper.
        originals[name.replace(".base_layer", "")] = layer
    return originals


def _requantize(model: nn.Module, formats: dict[str, QuantLinear], dtype: torch.dtype | None) -> tuple[float | None, int]:
    """Put merged layers back into 4 bits; returns (mean weight error, layers re-quantized).

    A layer no adapter changed gets its original 4-bit tensors back: rounding it again would add
    error for nothing (a dequantized block need not reach its old absmax, so the grid would move).
    """
    errors = []
    for name, old in formats.items():
        linear = model.get_submodule(name)
        weight = linear.weight.detach()
        if torch.equal(weight, old.dequantized_weight(dtype or old.weight_dtype)):
            set_submodule(model, name, old)
            continue
        layer = QuantLinear(
            old.in_features, old.out_features,
            quantize(weight, old.quant_type, old.block_size, old.double_quant, old.nested_block_size),
            linear.bias, old.compute_dtype, old.weight_dtype,
        )
        errors.append(relative_error(layer.dequantized_weight(torch.float32), weight.float()))
        set_submodule(model, name, layer.train(linear.training))
    return (sum(errors) / len(errors) if errors else None), len(errors)
