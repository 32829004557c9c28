"""RMSNorm, SwiGLU and rotary embedding as single autograd functions.

Each matches the HF Llama code it replaces to the rounding point, and saves less: HF's RMSNorm keeps
a float32 copy of its input for backward and SwiGLU keeps silu(gate) besides gate and up; these keep
only their bf16 inputs (plus one float32 per row for RMSNorm). On CUDA the work is one Triton kernel
per direction; elsewhere the same math runs as PyTorch ops, which is what CPU CI checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import use_triton

__all__ = [
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
]


# ----------------------------------------------------------------------------- RMSNorm
def _rms_norm_forward_torch(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x_f32 = x2d.float()
    rstd = torch.rsqrt(x_f32.pow(2).mean(-1) + eps)
    y = weight * (x_f32 * rstd[:, None]).to(x2d.dtype)
    return y, rstd


def _rms_norm_backward_torch(dy2d, x2d, weight, rstd):
    x_hat = x2d.float() * rstd[:, None]
    d_normed = (dy2d * weight).float()
    dot = (d_normed * x_hat).mean(-1, keepdim=True)
    return (rstd[:, None] * (d_normed - x_hat * dot)).to(x2d.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = x.reshape(-1, x.shape[-1])
        if use_triton(x2d) and x2d.stride(-1) == 1 and weight.dtype == x.dtype:
            from ._triton_kernels import rms_norm_forward

            y, rstd = rms_norm_forward(x2d, weight, eps)
        else:
            y, rstd = _rms_norm_forward_torch(x2d, weight, eps)
        ctx.save_for_backward(x2d, rstd)
        ctx.weight = weight  # a parameter: kept on ctx, not packed by activation checkpointing
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, rstd = ctx.saved_tensors
        weight = ctx.weight
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            if use_triton(dy2d) and dy2d.stride(-1) == 1 and weight.dtype == x2d.dtype == dy2d.dtype:
                from ._triton_kernels import rms_norm_backward

                dx = rms_norm_backward(dy2d, x2d, weight, rstd)
            else:
                dx = _rms_norm_backward_torch(dy2d, x2d, weight, rstd)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # only full fine-tuning trains the norm weight; a torch reduction is fine there
            normed = (x2d.float() * rstd[:, None]).to(x2d.dtype)
            dweight = (dy2d * normed).float().sum(0).to(weight.dtype)
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm: ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, statistics in float32."""
    return _RMSNormFunction.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_f32 = x.to(torch.float32)
    variance = x_f32.pow(2).mean(-1, keepdim=True)
    return weight * (x_f32 * torch.rsqrt(variance + eps)).to(x.dtype)


# ----------------------------------------------------------------------------- SwiGLU
def swiglu_forward_raw(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate, up) and gate.is_contiguous() and up.is_contiguous():
        from ._triton_kernels import swiglu_forward

        return swiglu_forward(gate, up)
    return F.silu(gate) * up


def swiglu_backward_raw(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    if use_triton(grad, gate, up) and gate.is_contiguous() and up.is_contiguous():
        from ._triton_kernels import swiglu_backward

        return swiglu_backward(grad, gate, up)
    sig = torch.sigmoid(gate.float())
    activated = (gate.float() * sig).to(gate.dtype)
    grad_activated = (grad * up).float()
    grad_gate = grad_activated * sig * (1.0 + gate.float() * (1.0 - sig))
    return grad_gate.to(gate.dtype), grad * activated


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward_raw(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return swiglu_backward_raw(grad, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` saving only gate and up."""
    return _SwiGLUFunction.apply(gate, up)


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
