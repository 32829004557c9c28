"""QuantLinear: a frozen linear layer whose weight is stored in 4 bits and dequantized per call.

The weight is never kept in full precision: forward dequantizes it (in row chunks for big
layers, so only a slice exists at a time), multiplies and drops it; backward dequantizes again to
send the gradient to the input. Nothing of the weight is saved for backward, which is where
QLoRA's memory saving comes from. The weight gets no gradient: train adapters on top of it.

`quant_lora_linear` (QuantLinear.lora_forward) is the same layer with one LoRA adapter on top as a
single autograd node, the 4-bit twin of deltatune.kernels.lora_linear: the adapter runs in the
activations' dtype, only x and the rank-wide x·Aᵀ are saved, and W is dequantized once in forward
and once in backward, never kept (ctx holds the layer, not a dequantized copy).

On CUDA the weight is dequantized whole up to CUDA_CHUNK_ELEMENTS (one kernel, one GEMM; a 7B
model's largest weight is 117 MB in bf16, the transient bitsandbytes' QLoRA path allocates too);
elsewhere in row chunks of CHUNK_ELEMENTS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hf_compat import is_conv1d
from ..kernels.cuda_graph import for_capture
from ..kernels.recompute import mark_fresh
from . import backends
from .formats import DEFAULT_BLOCK_SIZE, NESTED_BLOCK_SIZE, QuantizedWeight, check_quant_type, quantize

# Largest weight slice dequantized at once (elements): 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24
# The same on CUDA (elements): 512 MiB in bf16; a 7B model's weights are dequantized whole.
CUDA_CHUNK_ELEMENTS = 1 << 28
# The same while a CUDA graph is being captured (elements): 16 MiB in bf16. A replay pays nothing
# per launch, and the graph's memory pool holds its largest temporaries for good: a 7B MLP weight
# whole is 112 MiB of it.
CAPTURE_CHUNK_ELEMENTS = 1 << 23


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
        # backward dequantizes in the same chunks: it may run on autograd's thread, where a CUDA
        # graph's capture is not seen (the block graphs record forward and backward together)
        ctx.chunks = layer.compute_chunks(x.device.type)
        y = _dequantized_linear(x.reshape(-1, x.shape[-1]), layer, None, ctx.chunks)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: QuantLinear = ctx.layer
        chunks = ctx.chunks
        if len(chunks) == 1:
            return grad_output @ layer._dequantize_rows(grad_output.dtype, None), None
        grad_input = None
        for rows in chunks:
            part = grad_output[..., rows[0] : rows[1]] @ layer._dequantize_rows(grad_output.dtype, rows)
            grad_input = part if grad_input is None else grad_input.add_(part)
        return grad_input, None


def _dequantized_linear(x2d: torch.Tensor, layer: "QuantLinear", bias: torch.Tensor | None,
                        chunks: list[tuple[int, int]]) -> torch.Tensor:
    """x2d · Wᵀ (+ bias) in x2d's dtype, W dequantized in `chunks` of rows; each chunk's product
    is written into its columns of the output (no list of pieces to concatenate)."""
    if len(chunks) == 1:
        return F.linear(x2d, layer._dequantize_rows(x2d.dtype, None), bias)
    y = torch.empty(x2d.shape[0], layer.out_features, dtype=x2d.dtype, device=x2d.device)
    for first, last in chunks:
        torch.mm(x2d, layer._dequantize_rows(x2d.dtype, (first, last)).t(), out=y[:, first:last])
    return y if bias is None else y.add_(bias)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`: on CUDA one GEMM writing float32 from bf16/fp16 operands (torch.mm's
    out_dtype) where this torch has it, instead of a GEMM and a cast."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        if _MM_OUT_DTYPE.get("ok", True):
            try:
                out = torch.mm(a, b, out_dtype=dtype)
                _MM_OUT_DTYPE["ok"] = True
                return out
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE["ok"] = False
    return torch.mm(a, b).to(dtype)


def _dropout_helpers():
    from ..kernels.lora_linear import _draw_seed, dropout_mask

    return _draw_seed, dropout_mask


class _QuantLoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ with W 4-bit (dequantized per use, never saved) and b frozen.

    Mirrors deltatune.kernels.lora_linear: saves x (for A's gradient) and x·Aᵀ (for B's) through
    save_for_backward, so activation checkpointing drops and recomputes them; the rank-r casts of
    A and B ride on ctx; the scaling is a GEMM epilogue (alpha / beta); the dropout mask is drawn
    again from its seed in backward.
    """

    @staticmethod
    def forward(ctx, x, layer, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed):
        x2d = x.reshape(-1, x.shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        if dropout_p > 0:
            dropout_mask = _dropout_helpers()[1]
            xa = F.linear(x2d * dropout_mask(x2d.shape, dropout_p, dropout_seed, x.device, x.dtype), a)
        else:
            xa = F.linear(x2d, a)
        ctx.chunks = layer.compute_chunks(x.device.type)  # for backward too (see _DequantizedMatmul)
        y = _dequantized_linear(x2d, layer, bias, ctx.chunks)
        y.addmm_(xa, b.t(), alpha=scaling)

        needs_a, needs_b = ctx.needs_input_grad[3:5]
        ctx.save_for_backward(x2d if needs_a else None, xa if needs_b else None)
        ctx.layer, ctx.a, ctx.b = layer, a, b
        ctx.scaling, ctx.dropout_p, ctx.dropout_seed = scaling, dropout_p, dropout_seed
        ctx.x_shape = x.shape
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return mark_fresh(y.view(*x.shape[:-1], y.shape[-1]))  # new memory: see kernels/recompute.py

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa = ctx.saved_tensors
        layer: QuantLinear = ctx.layer
        a, b = ctx.a, ctx.b
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        scaling, p = ctx.scaling, ctx.dropout_p
        g = grad_y.reshape(-1, grad_y.shape[-1])

        grad_x = grad_a = grad_b = None
        mask = None
        if p > 0 and (needs_x or needs_a):
            mask = _dropout_helpers()[1]((g.shape[0], layer.in_features), p, ctx.dropout_seed, g.device, g.dtype)
        # On a CPU, MKL streams g fastest with the skinny operand row-major (see kernels.lora_linear);
        # cuBLAS takes either layout, so on CUDA the products are written in as few launches as can be.
        if needs_b:
            if g.is_cuda:
                grad_b = _mm_to(g.t(), xa, ctx.adapter_dtypes[1]).mul_(scaling)
            else:
                grad_b = torch.mm(xa.t(), g).t().to(ctx.adapter_dtypes[1]).mul_(scaling)
        if needs_x or needs_a:
            g_xa = torch.mm(g, b if g.is_cuda else b.t().contiguous().t())  # gradient reaching x·Aᵀ, without the scaling
            if needs_a:
                grad_a = _mm_to(g_xa.t(), x2d if mask is None else x2d * mask, ctx.adapter_dtypes[0]).mul_(scaling)
            if needs_x:
                grad_x = torch.mm(g_xa, a)
                if mask is not None:
                    grad_x.mul_(mask)
                grad_x = layer.add_input_grad_(grad_x, g, ctx.chunks, beta=scaling).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def quant_lora_linear(
    x: torch.Tensor,
    layer: "QuantLinear",
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """``layer(x) + scaling * dropout(x) @ A^T @ B^T`` as one autograd node (see _QuantLoraLinearFunction).

    Computes in ``x.dtype`` (A and B may be float32 master copies; their gradients come in their
    own dtype). Dropout applies only when ``training``; ``dropout_seed`` fixes its mask (tests).
    """
    if layer.bias is not None and layer.bias.requires_grad:
        raise ValueError("quant_lora_linear treats the base layer's bias as frozen; it must not require grad")
    p = float(dropout_p) if training else 0.0
    if p > 0 and dropout_seed is None:
        dropout_seed = _dropout_helpers()[0]()
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return _QuantLoraLinearFunction.apply(x, layer, bias, lora_a, lora_b, float(scaling), p, dropout_seed)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored as 4-bit codes plus block constants (buffers, so they move with
    .to() and count as the model's memory) and b kept as a frozen parameter.

    compute_dtype: the dtype of the matmul (e.g. torch.bfloat16); None follows the input (and
    autocast when it is on). The output is cast back to the input's dtype.
    """

    # The 4-bit codes, nearly all of the layer's bytes, may be sharded like weights: FSDP2 turns
    # them into frozen parameters (distributed.prepare) and gathers them for each forward and
    # backward. The block constants are small and stay whole on every rank.
    shardable_buffers = ("qweight",)

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
        weight = linear.weight.T if is_conv1d(linear) else linear.weight
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

    def _dequantize_rows(self, dtype: torch.dtype, rows: tuple[int, int] | None) -> torch.Tensor:
        """dequantized_weight for the compute paths (rows None: the whole weight)."""
        qweight = self.quantized()
        if rows is not None and rows != (0, self.out_features):
            qweight = qweight.row_slice(*rows)
        return backends.dequantize(qweight, dtype)

    def compute_chunks(self, device_type: str) -> list[tuple[int, int]]:
        """row_chunks() for compute on `device_type`: on CUDA up to CUDA_CHUNK_ELEMENTS at once, or
        CAPTURE_CHUNK_ELEMENTS while a CUDA graph is being captured."""
        if device_type != "cuda":
            return self.row_chunks()
        if for_capture():
            return self.row_chunks(CAPTURE_CHUNK_ELEMENTS)
        return self.row_chunks(CUDA_CHUNK_ELEMENTS)

    def row_chunks(self, max_elements: int | None = None) -> list[tuple[int, int]]:
        """Row ranges dequantized one at a time: the whole weight unless it has more than
        `max_elements` (default CHUNK_ELEMENTS)."""
        max_elements = CHUNK_ELEMENTS if max_elements is None else max_elements
        rows = self.out_features
        if rows * self.in_features <= max_elements:
            return [(0, rows)]
        align = self.quantized().row_alignment()
        step = max(align, (max_elements // self.in_features) // align * align)
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

    def lora_forward(
        self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0,
        training: bool = False,
    ) -> torch.Tensor | None:
        """``self(x) + scaling · dropout(x) Aᵀ Bᵀ`` in one autograd node (quant_lora_linear), or None
        where this layer's own forward must run (see accepts)."""
        if not self.accepts(x):
            return None
        return quant_lora_linear(x, self, lora_a, lora_b, scaling, dropout_p, training)

    # -- the frozen projection of fused kernels (deltatune.kernels.lora_mlp) ---------------------
    # A fused node takes this layer in place of a weight tensor: it asks for its row chunks once in
    # forward (backward dequantizes in the same ones) and lets the layer do both of its products.
    def accepts(self, x: torch.Tensor) -> bool:
        """Whether a fused node may compute this layer on `x` directly: x is in the compute dtype
        and autocast is off (otherwise the layer's own forward decides the dtypes)."""
        if not x.is_floating_point() or _autocast_dtype(x.device.type) is not None:
            return False
        return self.compute_dtype is None or x.dtype == self.compute_dtype

    def project(self, x2d: torch.Tensor, bias: torch.Tensor | None, chunks: list[tuple[int, int]]) -> torch.Tensor:
        """x2d · Wᵀ (+ bias), a new tensor in x2d's dtype; W dequantized in `chunks` (compute_chunks)."""
        return _dequantized_linear(x2d, self, None if bias is None else bias.to(x2d.dtype), chunks)

    def add_input_grad_(self, out: torch.Tensor, grad: torch.Tensor, chunks: list[tuple[int, int]],
                        beta: float = 1.0) -> torch.Tensor:
        """out ← beta · out + grad · W in place (the gradient a product x · Wᵀ sends to x), W
        dequantized in `chunks`, one slice at a time."""
        if len(chunks) == 1:
            return out.addmm_(grad, self._dequantize_rows(grad.dtype, None), beta=beta)
        if beta != 1.0:
            out.mul_(beta)
        for first, last in chunks:
            out.addmm_(grad[:, first:last], self._dequantize_rows(grad.dtype, (first, last)))
        return out

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


__all__ = ["QuantLinear", "quant_lora_linear", "quantized_layers", "quantized_parameter_count", "storage_report"]
