"""QuantLinear: a frozen linear layer whose weight is stored in 4 bits and dequantized per call.

The weight is never kept in full precision: forward dequantizes it (in row chunks for big
layers, so only a slice exists at a time), multiplies and drops it; backward dequantizes again to
send the gradient to the input. Nothing of the weight is saved for backward, which is where
QLoRA's memory saving comes from. The weight gets no gradient: train adapters on top of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .formats import DEFAULT_BLOCK_SIZE, NESTED_BLOCK_SIZE, QuantizedWeight, check_quant_type, quantize

# Largest weight slice dequantized at once (elements): 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # devices without autocast (meta)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _DequantizedMatmul(torch.autograd.Function):
    """x @ Wᵀ with W dequantized on the fly in forward and again in backward (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        outputs = [F.linear(x, layer.dequantized_weight(x.dtype, rows)) for rows in layer.row_chunks()]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: QuantLinear = ctx.layer
        grad_input = None
        for rows in layer.row_chunks():
            part = grad_output[..., rows[0] : rows[1]] @ layer.dequantized_weight(grad_output.dtype, rows)
            grad_input = part if grad_input is None else grad_input + part
        return grad_input, None


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored as 4-bit codes plus block constants (buffers, so they move with
    .to() and count as the model's memory) and b kept as a frozen parameter.

    compute_dtype: the dtype of the matmul (e.g. torch.bfloat16); None follows the input (and
    autocast when it is on). The output is cast back to the input's dtype.
    """

    def __init__(
        self, in_features: int, out_features: int, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None, weight_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"Quantized weight of shape {qweight.shape} does not fit a {in_features} -> {out_features} layer.")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # of the original weight: what merging gives back
        self._set_quantized(qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_quantized(self, qweight: QuantizedWeight) -> None:
        self.quant_type = qweight.quant_type
        self.block_size = qweight.block_size
        self.nested_block_size = qweight.nested_block_size
        self.register_buffer("qweight", qweight.packed)
        self.register_buffer("absmax", qweight.absmax)
        self.register_buffer("nested_scale", qweight.nested_scale)
        self.register_buffer("absmax_offset", qweight.offset)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, quant_type: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
        compute_dtype: torch.dtype | None = None, nested_block_size: int = NESTED_BLOCK_SIZE,
    ) -> "QuantLinear":
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose weight is stored in × out)."""
        weight = linear.weight.T if type(linear).__name__ == "Conv1D" else linear.weight
        return cls.from_weight(weight, getattr(linear, "bias", None), quant_type, block_size, double_quant, compute_dtype, nested_block_size)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, quant_type: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE,
        double_quant: bool = True, compute_dtype: torch.dtype | None = None, nested_block_size: int = NESTED_BLOCK_SIZE,
    ) -> "QuantLinear":
        if weight.dim() != 2:
            raise ValueError(f"A linear weight is 2-D (out × in), got shape {tuple(weight.shape)}.")
        qweight = quantize(weight, check_quant_type(quant_type), block_size, double_quant, nested_block_size)
        out_features, in_features = weight.shape
        return cls(in_features, out_features, qweight, bias, compute_dtype, weight.dtype)

    # -- the stored weight --------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_scale is not None

    def quantized(self) -> QuantizedWeight:
        """The stored tensors (views of this layer's buffers)."""
        return QuantizedWeight(
            self.qweight, self.absmax, self.nested_scale, self.absmax_offset, (self.out_features, self.in_features),
            self.quant_type, self.block_size, self.nested_block_size,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """W (out × in), or its rows [first, last) from row_chunks(), as a new tensor in `dtype`
        (default: the original weight's dtype). Writing to it does not change the layer."""
        qweight = self.quantized()
        if rows is not None and rows != (0, self.out_features):
            qweight = qweight.row_slice(*rows)
        return backends.dequantize(qweight, dtype or self.weight_dtype)

    def row_chunks(self) -> list[tuple[int, int]]:
        """Row ranges dequantized one at a time: the whole weight unless it is big."""
        rows = self.out_features
        if rows * self.in_features <= CHUNK_ELEMENTS:
            return [(0, rows)]
        align = self.quantized().row_alignment()
        step = max(align, (CHUNK_ELEMENTS // self.in_features) // align * align)
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def weight_nbytes(self) -> int:
        """Bytes the weight takes as stored: 4-bit codes plus every block constant."""
        return self.quantized().nbytes()

    @property
    def packed_parameter_count(self) -> int:
        """Weights held in the 4-bit buffers (see deltatune.layer.packed_parameter_count)."""
        return self.in_features * self.out_features

    def bytes_per_param(self) -> float:
        """Stored weight bytes per weight element (0.5 would be the 4-bit codes alone)."""
        return self.weight_nbytes() / (self.in_features * self.out_features)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (for merging in full precision)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return linear.train(self.training)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) / .half() would round the block constants too; keep them float32
        # (they are a few percent of the bytes) and let the cast reach the bias and compute only.
        constants = {n: self._buffers[n] for n in ("absmax", "nested_scale", "absmax_offset") if self._buffers[n] is not None}
        super()._apply(fn, recurse)
        for name, original in constants.items():
            if self._buffers[name].dtype != original.dtype:
                self._buffers[name] = original.to(self._buffers[name].device)
        return self

    # -- compute ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast_dtype = _autocast_dtype(x.device.type)
        dtype = self.compute_dtype or autocast_dtype or (x.dtype if x.is_floating_point() else self.weight_dtype)
        out = _DequantizedMatmul.apply(x.to(dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        # Under autocast the caller expects the autocast dtype; otherwise keep the model's dtype.
        return out if autocast_dtype is not None else out.to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, block_size={self.block_size}{dq}, {self.bytes_per_param():.4f} bytes/param"
        )


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]


def quantized_parameter_count(model: nn.Module) -> int:
    """Weights held as 4-bit buffers: not in model.parameters(), but parameters of the base."""
    return sum(m.packed_parameter_count for _, m in quantized_layers(model))


def storage_report(model: nn.Module) -> dict[str, float]:
    """Bytes per weight of the quantized layers (as stored) and of the whole model's tensors."""
    layers = [m for _, m in quantized_layers(model)]
    quant_params = sum(m.in_features * m.out_features for m in layers)
    quant_bytes = sum(m.weight_nbytes() for m in layers)
    seen = {id(t) for m in layers for t in m.quantized().tensors().values()}
    other_params = other_bytes = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:  # tied weights count once
            seen.add(id(tensor))
            other_params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
            other_bytes += tensor.numel() * tensor.element_size()
    return {
        "quantized_layers": len(layers),
        "quantized_params": quant_params,
        "quantized_bytes_per_param": quant_bytes / max(quant_params, 1),
        "model_params": quant_params + other_params,
        "model_bytes": quant_bytes + other_bytes,
        "model_bytes_per_param": (quant_bytes + other_bytes) / max(quant_params + other_params, 1),
    }


__all__ = ["QuantLinear", "quantized_layers", "quantized_parameter_count", "storage_report"]
