"""A LoRA linear layer as one autograd function.

    y = x @ W^T + b + scaling * dropout(x) @ A^T @ B^T      W (out, in), A (r, in), B (out, r)

W and b are frozen. Compared with composing the layer from ``nn.Linear`` modules (as HF peft does),
the function
  * saves only x (which A's gradient needs anyway) and the rank-wide product x·A^T; HF peft with its
    default ``autocast_adapter_dtype`` also saves a float32 copy of x per adapter,
  * computes in the activations' dtype (bf16 matmuls on the tensor cores) even when A and B are kept
    in float32, casting only the tiny adapter matrices,
  * lets the base matmul add the LoRA term in its epilogue (``addmm`` with C = LoRA output), so the
    LoRA branch costs one extra write of y instead of three passes (scale, add, copy),
  * does the same in backward for dx (``addmm`` with C = the rank-r correction),
  * never stores the dropout mask: it is regenerated from a seed in backward.

The same code runs on CPU and CUDA; every product is a cuBLAS/MKL call, which is where the time goes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lora_linear", "lora_linear_reference", "dropout_mask"]


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
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_seed):
        in_features = x.shape[-1]
        out_features = weight.shape[0]
        x2d = x.reshape(-1, in_features)
        compute_dtype = x.dtype
        a = lora_a.to(compute_dtype)
        b_scaled = (lora_b * scaling).to(compute_dtype)

        dropped = x2d * dropout_mask(x2d.shape, dropout_p, dropout_seed, x.device, compute_dtype) if dropout_p > 0 else x2d
        xa = dropped @ a.t()
        lora_out = torch.addmm(bias.to(compute_dtype), xa, b_scaled.t()) if bias is not None else xa @ b_scaled.t()
        y = torch.addmm(lora_out, x2d, weight.t())
        del lora_out, dropped

        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x2d if needs_a else None, xa if needs_b else None, weight, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, xa, weight, lora_a, lora_b = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        scaling, p = ctx.scaling, ctx.dropout_p
        compute_dtype = grad_y.dtype
        g = grad_y.reshape(-1, weight.shape[0])

        grad_x = grad_a = grad_b = None
        mask = None
        if p > 0 and (needs_x or needs_a):
            mask = dropout_mask((g.shape[0], weight.shape[1]), p, ctx.dropout_seed, g.device, compute_dtype)

        if needs_b:
            grad_b = (g.t() @ (xa * scaling)).to(lora_b.dtype)
        if needs_x or needs_a:
            # g @ (s·B): the rank-wide gradient that reaches x·A^T
            g_xa = g @ (lora_b * scaling).to(compute_dtype)
            if needs_a:
                dropped = x2d * mask if mask is not None else x2d
                grad_a = (g_xa.t() @ dropped).to(lora_a.dtype)
                del dropped
            if needs_x:
                correction = g_xa @ lora_a.to(compute_dtype)
                if mask is not None:
                    correction.mul_(mask)
                grad_x = torch.addmm(correction, g, weight).view(ctx.x_shape)
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
