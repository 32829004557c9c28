"""A LoRA linear layer as one autograd function.

    y = x @ W^T + b + scaling * dropout(x) @ A^T @ B^T      W (out, in), A (r, in), B (out, r)

W and b are frozen. Compared with composing the layer from ``nn.Linear`` modules (as HF peft does),
the function
  * saves only x (which A's gradient needs anyway) and the rank-wide product x·A^T; HF peft with its
    default ``autocast_adapter_dtype`` also saves a float32 copy of x per adapter,
  * computes in the activations' dtype (bf16 matmuls on the tensor cores) even when A and B are kept
    in float32, casting only the tiny adapter matrices,
  * adds the rank-r term into y in place (``addmm_``, the scaling as alpha): one extra read and
    write of y instead of peft's three passes (scale, add, copy),
  * does the same in backward for dx (the rank-r correction takes g @ W in place, scaling as beta),
  * never stores the dropout mask: it is regenerated from a seed in backward.

The same code runs on CPU and CUDA; every product is a cuBLAS/MKL call, which is where the time goes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .recompute import mark_fresh

__all__ = ["LoraParams", "lora_linear", "lora_linear_reference", "dropout_mask"]


class LoraParams(NamedTuple):
    """What a LoRA layer hands the fused kernels: y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ."""

    weight: torch.Tensor  # W (out, in), frozen
    bias: torch.Tensor | None  # b (out,), frozen
    lora_a: torch.Tensor  # A (r, in)
    lora_b: torch.Tensor  # B (out, r)
    scaling: float
    dropout_p: float = 0.0


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1/(1-p)) drawn from ``seed``: same seed, same mask."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    keep = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))


def _draw_seed() -> int:
    # Drawn from the CPU default generator so that activation checkpointing, which restores the RNG
    # state before recomputing, regenerates the same mask.
    return int(torch.randint(0, 2**62, (1,)).item())


class _LoraLinearFunction(torch.autograd.Function):
    # Each line below is one dispatcher call or kernel launch; at 8k tokens a training step of a
    # 1B model is close to host-bound, so the count matters as much as the bytes. The scaling
    # rides on GEMM epilogues (alpha/beta) instead of separate multiplies.
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed):
        x2d = x.reshape(-1, x.shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        if dropout_p > 0:
            xa = F.linear(x2d * dropout_mask(x2d.shape, dropout_p, dropout_seed, x.device, x.dtype), a)
        else:
            xa = F.linear(x2d, a)
        y = F.linear(x2d, weight, bias)
        y.addmm_(xa, b.t(), alpha=scaling)

        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        # Only activations go through save_for_backward (activation checkpointing packs and
        # recomputes each one, at a Python cost per tensor); the frozen weight and the rank-r
        # casts of A and B are kept on ctx as they are.
        ctx.save_for_backward(x2d if needs_a else None, xa if needs_b else None)
        ctx.weight, ctx.a, ctx.b = weight, a, b
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        ctx.x_shape = x.shape
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return mark_fresh(y.view(*x.shape[:-1], y.shape[-1]))  # new memory: see kernels/recompute.py

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa = ctx.saved_tensors
        weight, a, b = ctx.weight, ctx.a, ctx.b
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        scaling, p = ctx.scaling, ctx.dropout_p
        g = grad_y.reshape(-1, grad_y.shape[-1])

        grad_x = grad_a = grad_b = None
        mask = None
        if p > 0 and (needs_x or needs_a):
            mask = dropout_mask((g.shape[0], weight.shape[1]), p, ctx.dropout_seed, g.device, g.dtype)

        # These rank-r products are memory-bound passes over g. MKL streams g fastest when the
        # skinny operand is laid out row-major, so they are written as (xa^T g)^T and g (B^T)^T
        # with B^T contiguous: 3-4x faster on a CPU than g^T xa and g B, the same on cuBLAS.
        if needs_b:
            grad_b = torch.mm(xa.t(), g).t().to(ctx.adapter_dtypes[1]).mul_(scaling)
        if needs_x or needs_a:
            g_xa = torch.mm(g, b.t().contiguous().t())  # gradient reaching x·A^T, without the scaling
            if needs_a:
                grad_a = torch.mm(g_xa.t(), x2d if mask is None else x2d * mask).to(ctx.adapter_dtypes[0]).mul_(scaling)
            if needs_x:
                correction = torch.mm(g_xa, a)
                if mask is not None:
                    correction.mul_(mask)
                grad_x = correction.addmm_(g, weight, beta=scaling).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """``x @ W^T + b + scaling * dropout(x) @ A^T @ B^T`` with W and b frozen (they get no gradient).

    Computes in ``x.dtype``; A and B may be stored in another dtype (float32 master copies) and get
    gradients in their own dtype. Dropout applies only when ``training``; ``dropout_seed`` fixes its
    mask (tests), otherwise a seed is drawn from torch's CPU generator.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear treats weight and bias as frozen; they must not require grad")
    p = float(dropout_p) if training else 0.0
    if p > 0 and dropout_seed is None:
        dropout_seed = _draw_seed()
    return _LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), p, dropout_seed)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """The same function from plain autograd ops (what ``nn.Linear`` composition computes)."""
    base = F.linear(x, weight, bias)
    p = float(dropout_p) if training else 0.0
    if p > 0 and dropout_seed is not None:
        dropped = x * dropout_mask(x.shape, p, dropout_seed, x.device, x.dtype)
    else:
        dropped = F.dropout(x, p, training=p > 0)
    lora = F.linear(F.linear(dropped, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + scaling * lora
