"""4-bit storage of a frozen base model's linear layers (NF4, FP4, int4) for QLoRA.

    from deltatune.quant import quantize, load_quantized, merge_quantized
    base = load_quantized(model_folder, "nf4")           # straight into 4 bits, layer by layer
    base = quantize(full_precision_model, "nf4")          # or in place
    model = dt.wrap(base, dt.LoraConfig(r=8))              # LoRA/DoRA train on top unchanged
    merged, report = merge_quantized(model, "requantize", sample_inputs=batch)

Or in one step: dt.wrap(full_precision_model, dt.QLoraConfig(r=8)) (the "qlora" method).
"""

from .backends import backend_name
from .convert import load_quantized, quantize
from .formats import (
    DEFAULT_BLOCK_SIZE, NESTED_BLOCK_SIZE, QUANT_TYPES, QuantizationError, QuantizedWeight, codebook, dequantize,
    relative_error,
)
from .formats import quantize as quantize_tensor
from .linear import QuantLinear, quantized_layers, quantized_parameter_count, storage_report
from .merge import MergeReport, merge_quantized

__all__ = [
    "DEFAULT_BLOCK_SIZE", "MergeReport", "NESTED_BLOCK_SIZE", "QUANT_TYPES", "QuantLinear", "QuantizationError",
    "QuantizedWeight", "backend_name", "codebook", "dequantize", "load_quantized", "merge_quantized", "quantize",
    "quantize_tensor", "quantized_layers", "quantized_parameter_count", "relative_error", "storage_report",
]
