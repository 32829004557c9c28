"""A whole gated MLP with LoRA on gate, up and down projections, as one autograd function.

    out = down(act(gate(x)) * up(x)),   each projection  W x + b + s · B A x

act is SiLU (Llama, Mistral, Qwen) or GELU's tanh approximation (Gemma).

Against three ``lora_linear`` calls plus a SwiGLU this reads x once for both A projections (their
A matrices are stacked), accumulates dx in place through GEMM epilogues instead of separate adds,
and runs one Python autograd node instead of four: at 8k tokens a 1B model's training step is
close to host-bound, so fewer nodes and launches matter as much as bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_ops import check_activation, gated_activation_reference, gated_backward_raw, gated_forward_raw
from .lora_linear import LoraParams
from .recompute import mark_fresh, may_overwrite, overwritten

__all__ = ["lora_mlp", "lora_mlp_reference", "LoraParams", "lora_fast_params"]


def lora_fast_params(module: torch.nn.Module) -> LoraParams | None:
    """The fast-path parameters a LoRA layer offers through ``lora_fast_path_params()``, else None."""
    getter = getattr(type(module), "lora_fast_path_params", None)
    return getter(module) if getter is not None else None


class _LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, gate_bias, gate_a, gate_b, up_w, up_bias, up_a, up_b, down_w, down_bias, down_a, down_b, scalings, activation):
        s_gate, s_up, s_down = scalings
        dtype = x.dtype
        x2d = x.reshape(-1, x.shape[-1])
        a_gate_up = torch.cat((gate_a, up_a)).to(dtype)
        b_gate, b_up = gate_b.to(dtype), up_b.to(dtype)
        a_down, b_down = down_a.to(dtype), down_b.to(dtype)
        rank_gate = gate_a.shape[0]

        xa_gate_up = F.linear(x2d, a_gate_up)
        gate = F.linear(x2d, gate_w, gate_bias)
        gate.addmm_(xa_gate_up[:, :rank_gate], b_gate.t(), alpha=s_gate)
        up = F.linear(x2d, up_w, up_bias)
        up.addmm_(xa_gate_up[:, rank_gate:], b_up.t(), alpha=s_up)
        hidden = gated_forward_raw(gate, up, activation)
        xa_down = F.linear(hidden, a_down)
        out = F.linear(hidden, down_w, down_bias)
        out.addmm_(xa_down, b_down.t(), alpha=s_down)

        # activations through save_for_backward, frozen weights and rank-r casts on ctx (see lora_linear).
        # Not `hidden`: backward recomputes it from gate and up (one elementwise pass), which keeps
        # intermediate-size activations per token and layer at two, not three (2 GiB on a 1.1B model at 8k tokens).
        ctx.save_for_backward(x2d, gate, up, xa_gate_up, xa_down)
        ctx.weights = (gate_w, up_w, down_w, a_gate_up, b_gate, b_up, a_down, b_down)
        ctx.scalings = scalings
        ctx.activation = activation
        ctx.rank_gate = rank_gate
        # gate and up are this node's own: in a recomputation differentiated once, backward writes
        # their gradients over them (kernels/recompute.py)
        ctx.overwrite = may_overwrite(mark_fresh(gate), mark_fresh(up))
        ctx.x_shape = x.shape
        ctx.adapter_dtypes = (gate_a.dtype, gate_b.dtype, up_a.dtype, up_b.dtype, down_a.dtype, down_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, gate, up, xa_gate_up, xa_down = ctx.saved_tensors
        gate_w, up_w, down_w, a_gate_up, b_gate, b_up, a_down, b_down = ctx.weights
        s_gate, s_up, s_down = ctx.scalings
        r = ctx.rank_gate
        dt_ga, dt_gb, dt_ua, dt_ub, dt_da, dt_db = ctx.adapter_dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1])

        # down projection
        grad_down_b = torch.mm(g.t(), xa_down).to(dt_db).mul_(s_down)
        g_xa_down = torch.mm(g, b_down)
        hidden = gated_forward_raw(gate, up, ctx.activation)
        grad_down_a = torch.mm(g_xa_down.t(), hidden).to(dt_da).mul_(s_down)
        del hidden
        grad_hidden = torch.mm(g_xa_down, a_down)
        grad_hidden.addmm_(g, down_w, beta=s_down)

        grad_gate, grad_up = gated_backward_raw(grad_hidden, gate, up, ctx.activation, into_inputs=ctx.overwrite)
        if ctx.overwrite:
            overwritten(gate, up)
        del grad_hidden

        # gate and up projections share x: one stacked rank-(r_gate + r_up) product for A and dx
        grad_gate_b = torch.mm(grad_gate.t(), xa_gate_up[:, :r]).to(dt_gb).mul_(s_gate)
        grad_up_b = torch.mm(grad_up.t(), xa_gate_up[:, r:]).to(dt_ub).mul_(s_up)
        g_xa = torch.cat((torch.mm(grad_gate, b_gate).mul_(s_gate), torch.mm(grad_up, b_up).mul_(s_up)), dim=1)
        grad_a_gate_up = torch.mm(g_xa.t(), x2d)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g_xa, a_gate_up)
            grad_x.addmm_(grad_gate, gate_w)
            grad_x.addmm_(grad_up, up_w)
            grad_x = grad_x.view(ctx.x_shape)
        needs = ctx.needs_input_grad
        return (
            grad_x,
            None, None, grad_a_gate_up[:r].to(dt_ga) if needs[3] else None, grad_gate_b if needs[4] else None,
            None, None, grad_a_gate_up[r:].to(dt_ua) if needs[7] else None, grad_up_b if needs[8] else None,
            None, None, grad_down_a if needs[11] else None, grad_down_b if needs[12] else None,
            None, None,
        )


def _check_frozen(params: LoraParams) -> None:
    if params.weight.requires_grad or (params.bias is not None and params.bias.requires_grad):
        raise ValueError("lora_mlp treats the projections' weight and bias as frozen; they must not require grad")


def lora_mlp(x: torch.Tensor, gate: LoraParams, up: LoraParams, down: LoraParams, activation: str = "silu") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with each projection a LoRA linear without dropout.

    Each of ``gate``, ``up``, ``down`` is a :class:`LoraParams` whose ``dropout_p`` is 0. Same
    conventions as ``lora_linear``. activation: "silu" or "gelu_tanh".
    """
    check_activation(activation)
    gate, up, down = (LoraParams(*p) for p in (gate, up, down))
    for params in (gate, up, down):
        _check_frozen(params)
        if params.dropout_p:
            raise ValueError("lora_mlp has no dropout; use lora_linear per projection")
    tensors = [t for p in (gate, up, down) for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    scalings = (float(gate.scaling), float(up.scaling), float(down.scaling))
    return _LoraMLPFunction.apply(x, *tensors, scalings, activation)


def lora_mlp_reference(x: torch.Tensor, gate: LoraParams, up: LoraParams, down: LoraParams,
                       activation: str = "silu") -> torch.Tensor:
    from .lora_linear import lora_linear_reference

    def project(inp, params):
        p = LoraParams(*params)
        return lora_linear_reference(inp, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling)

    return project(gated_activation_reference(project(x, gate), project(x, up), activation), down)
