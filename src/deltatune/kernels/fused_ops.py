"""RMSNorm (Llama's and Gemma's), gated activations (SwiGLU, GeGLU) and rotary embedding as single
autograd functions.

Each matches the HF code it replaces to the rounding point, and saves less: HF's RMSNorm keeps
a float32 copy of its input for backward and SwiGLU keeps silu(gate) besides gate and up; these keep
only their bf16 inputs (plus one float32 per row for RMSNorm). On CUDA the work is one Triton kernel
per direction; elsewhere the same math runs as PyTorch ops, which is what CPU CI checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton
from .recompute import may_overwrite, overwritten

__all__ = [
    "GATED_ACTIVATIONS",
    "gated_activation",
    "gated_activation_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
]


# ----------------------------------------------------------------------------- RMSNorm
# Two scalings exist: Llama's `weight * normed.to(dtype)` (rounded before the scale) and Gemma's
# `(normed * (1 + weight)).to(dtype)` (scaled in float32, weights stored as offsets from one).
def _norm_scale(weight: torch.Tensor, unit_offset: bool) -> torch.Tensor:
    return 1.0 + weight.float() if unit_offset else weight


def _rms_norm_forward_torch(x2d, weight, eps: float, unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x_f32 = x2d.float()
    rstd = torch.rsqrt(x_f32.pow(2).mean(-1) + eps)
    if unit_offset:
        return (x_f32 * rstd[:, None] * _norm_scale(weight, True)).to(x2d.dtype), rstd
    return weight * (x_f32 * rstd[:, None]).to(x2d.dtype), rstd


def _rms_norm_backward_torch(dy2d, x2d, weight, rstd, unit_offset: bool):
    x_hat = x2d.float() * rstd[:, None]
    d_normed = dy2d.float() * _norm_scale(weight, True) if unit_offset else (dy2d * weight).float()
    dot = (d_normed * x_hat).mean(-1, keepdim=True)
    return (rstd[:, None] * (d_normed - x_hat * dot)).to(x2d.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        x2d = x.reshape(-1, x.shape[-1])
        if use_triton(x2d) and x2d.stride(-1) == 1 and weight.dtype == x.dtype:
            from ._triton_kernels import rms_norm_forward

            y, rstd = rms_norm_forward(x2d, weight, eps, unit_offset)
        else:
            y, rstd = _rms_norm_forward_torch(x2d, weight, eps, unit_offset)
        ctx.save_for_backward(x2d, rstd)
        ctx.weight = weight  # a parameter: kept on ctx, not packed by activation checkpointing
        ctx.x_shape = x.shape
        ctx.unit_offset = unit_offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, rstd = ctx.saved_tensors
        weight, unit_offset = ctx.weight, ctx.unit_offset
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            if use_triton(dy2d) and dy2d.stride(-1) == 1 and weight.dtype == x2d.dtype == dy2d.dtype:
                from ._triton_kernels import rms_norm_backward

                dx = rms_norm_backward(dy2d, x2d, weight, rstd, unit_offset)
            else:
                dx = _rms_norm_backward_torch(dy2d, x2d, weight, rstd, unit_offset)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # only full fine-tuning trains the norm weight; a torch reduction is fine there
            x_hat = x2d.float() * rstd[:, None]
            normed = x_hat if unit_offset else x_hat.to(x2d.dtype)
            dweight = (dy2d * normed).float().sum(0).to(weight.dtype)
        return dx, dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """HF Llama RMSNorm: ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, statistics in float32.

    unit_offset: Gemma's RMSNorm instead, ``(x * rsqrt(mean(x²) + eps) * (1 + weight)).to(x.dtype)``
    with the scale applied in float32."""
    return _RMSNormFunction.apply(x, weight, eps, unit_offset)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    x_f32 = x.to(torch.float32)
    normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).type_as(x)
    return weight * normed.to(x.dtype)


# ----------------------------------------------------------------------------- gated activations
# `act(gate) * up` for the two activations gated MLPs use: SiLU (SwiGLU: Llama, Qwen, Mistral) and
# GELU's tanh approximation (GeGLU: Gemma). As in HF, act(gate) is rounded to the input dtype
# before the product.
GATED_ACTIVATIONS = ("silu", "gelu_tanh")


def check_activation(activation: str) -> None:
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(GATED_ACTIVATIONS)}, got {activation!r}")


def _activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")


def _activation_grad(grad_activated: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        sig = torch.sigmoid(gate.float())
        return (grad_activated.float() * sig * (1.0 + gate.float() * (1.0 - sig))).to(gate.dtype)
    return torch.ops.aten.gelu_backward(grad_activated, gate, approximate="tanh")


def gated_forward_raw(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    if use_triton(gate, up) and gate.is_contiguous() and up.is_contiguous():
        from ._triton_kernels import gated_forward

        return gated_forward(gate, up, activation)
    return _activate(gate, activation) * up


def gated_backward_raw(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str = "silu",
                       into_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of ``act(gate) * up``. into_inputs: written over gate and up (which the
    caller no longer needs; see kernels/recompute.py), saving two intermediate-size tensors."""
    grad = grad.contiguous()
    if into_inputs and not (gate.is_contiguous() and up.is_contiguous() and gate.dtype == up.dtype == grad.dtype):
        into_inputs = False
    if use_triton(grad, gate, up) and gate.is_contiguous() and up.is_contiguous():
        from ._triton_kernels import gated_backward

        # elementwise: each element of gate and up is read before its gradient is written there
        return gated_backward(grad, gate, up, activation, into_inputs=into_inputs)
    grad_gate, grad_up = _activation_grad(grad * up, gate, activation), grad * _activate(gate, activation)
    if into_inputs:  # same values, same memory as the kernel's (no saving here, the semantics CPU tests check)
        return gate.copy_(grad_gate), up.copy_(grad_up)
    return grad_gate, grad_up


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        ctx.overwrite = may_overwrite(gate, up)
        return gated_forward_raw(gate, up, activation)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grads = gated_backward_raw(grad, gate, up, ctx.activation, into_inputs=ctx.overwrite)
        if ctx.overwrite:
            overwritten(gate, up)
        return (*grads, None)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` saving only gate and up; activation is one of GATED_ACTIVATIONS."""
    check_activation(activation)
    return _GatedFunction.apply(gate, up, activation)


def gated_activation_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    return _activate(gate, activation) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` saving only gate and up."""
    return gated_activation(gate, up, "silu")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ----------------------------------------------------------------------------- rotary embedding
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _triton_rotary_ok(x: torch.Tensor, cos: torch.Tensor) -> bool:
    half = x.shape[-1] // 2
    return use_triton(x, cos) and x.dim() == 4 and cos.dim() == 3 and half >= 1 and (half & (half - 1)) == 0


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        # cos/sin are shared by every layer: kept on ctx rather than packed per layer by checkpointing
        ctx.cos, ctx.sin = cos, sin
        if _triton_rotary_ok(x, cos):
            from ._triton_kernels import rotary

            return rotary(x, cos, sin, backward=False)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return (x * c) + (_rotate_half(x) * s)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.cos, ctx.sin
        if _triton_rotary_ok(grad, cos):
            from ._triton_kernels import rotary

            return rotary(grad, cos, sin, backward=True), None, None
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return (grad * c) + _rotate_half_transposed(grad * s), None, None


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` for x (B, H, S, D) and cos, sin (B, S, D); cos/sin get no grad."""
    if cos.requires_grad or sin.requires_grad:
        return rotary_embedding_reference(x, cos, sin)
    return _RotaryFunction.apply(x, cos, sin)


def rotary_embedding_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * c) + (_rotate_half(x) * s)
