"""A whole gated MLP with LoRA on gate, up and down projections, as one autograd function.

    out = down(act(gate(x)) * up(x)),   each projection  W x + b + s · B A x

act is SiLU (Llama, Mistral, Qwen) or GELU's tanh approximation (Gemma).

Against three ``lora_linear`` calls plus a SwiGLU this reads x once for both A projections (their
A matrices are stacked), accumulates dx in place through GEMM epilogues instead of separate adds,
and runs one Python autograd node instead of four: at 8k tokens a 1B model's training step is
close to host-bound, so fewer nodes and launches matter as much as bytes.

A projection's frozen W is a tensor, or a frozen projection object that computes its own two
products with W (deltatune.quant.QuantLinear: a 4-bit weight dequantized per use, never saved).
The saving is the same over both: per token and layer only x, gate and up wait for backward,
whose gradients are then written over gate and up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused_ops import check_activation, gated_activation_reference, gated_backward_raw, gated_forward_raw
from .lora_linear import LoraParams
from .recompute import mark_fresh, may_overwrite, overwritten

__all__ = ["lora_mlp", "lora_mlp_reference", "LoraParams", "lora_fast_params", "takes_input"]


def lora_fast_params(module: torch.nn.Module) -> LoraParams | None:
    """The parameters a LoRA layer offers the one-node MLP (``lora_mlp_params()``, where a 4-bit base
    stands in for its weight; else ``lora_fast_path_params()``), or None."""
    getter = getattr(type(module), "lora_mlp_params", None) or getattr(type(module), "lora_fast_path_params", None)
    return getter(module) if getter is not None else None


def _is_frozen_projection(weight) -> bool:
    return not isinstance(weight, torch.Tensor)


def takes_input(x: torch.Tensor, *projections: LoraParams) -> bool:
    """Whether lora_mlp can run these projections on x: weight tensors always; a frozen projection
    object (QuantLinear) where it accepts x (its compute dtype, autocast off)."""
    return all(not _is_frozen_projection(p.weight) or p.weight.accepts(x) for p in projections)


def _chunks_of(weight, x: torch.Tensor):
    """How a frozen projection object dequantizes for x (kept for backward); None for a tensor."""
    return weight.compute_chunks(x.device.type) if _is_frozen_projection(weight) else None


def _project(x2d: torch.Tensor, weight, bias: torch.Tensor | None, chunks) -> torch.Tensor:
    """x2d · Wᵀ + b, a new tensor."""
    return F.linear(x2d, weight, bias) if chunks is None else weight.project(x2d, bias, chunks)


def _add_input_grad_(out: torch.Tensor, grad: torch.Tensor, weight, chunks, beta: float = 1.0) -> torch.Tensor:
    """out ← beta · out + grad · W, in place."""
    return out.addmm_(grad, weight, beta=beta) if chunks is None else weight.add_input_grad_(out, grad, chunks, beta)


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

        # backward dequantizes a 4-bit W in the chunks forward used (see quant.linear._DequantizedMatmul)
        chunks = (_chunks_of(gate_w, x), _chunks_of(up_w, x), _chunks_of(down_w, x))

        xa_gate_up = F.linear(x2d, a_gate_up)
        gate = _project(x2d, gate_w, gate_bias, chunks[0])
        gate.addmm_(xa_gate_up[:, :rank_gate], b_gate.t(), alpha=s_gate)
        up = _project(x2d, up_w, up_bias, chunks[1])
        up.addmm_(xa_gate_up[:, rank_gate:], b_up.t(), alpha=s_up)
        hidden = gated_forward_raw(gate, up, activation)
        xa_down = F.linear(hidden, a_down)
        out = _project(hidden, down_w, down_bias, chunks[2])
        out.addmm_(xa_down, b_down.t(), alpha=s_down)

        # activations through save_for_backward, frozen weights and rank-r casts on ctx (see lora_linear).
        # Not `hidden`: backward recomputes it from gate and up (one elementwise pass), which keeps
        # intermediate-size activations per token and layer at two, not three (2 GiB on a 1.1B model at 8k tokens).
        ctx.save_for_backward(x2d, gate, up, xa_gate_up, xa_down)
        ctx.weights = (gate_w, up_w, down_w, a_gate_up, b_gate, b_up, a_down, b_down)
        ctx.chunks = chunks
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
        grad_hidden = _add_input_grad_(torch.mm(g_xa_down, a_down), g, down_w, ctx.chunks[2], beta=s_down)

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
            grad_x = _add_input_grad_(torch.mm(g_xa, a_gate_up), grad_gate, gate_w, ctx.chunks[0])
            grad_x = _add_input_grad_(grad_x, grad_up, up_w, ctx.chunks[1]).view(ctx.x_shape)
        needs = ctx.needs_input_grad
        return (
            grad_x,
            None, None, grad_a_gate_up[:r].to(dt_ga) if needs[3] else None, grad_gate_b if needs[4] else None,
            None, None, grad_a_gate_up[r:].to(dt_ua) if needs[7] else None, grad_up_b if needs[8] else None,
            None, None, grad_down_a if needs[11] else None, grad_down_b if needs[12] else None,
            None, None,
        )


def _check_frozen(params: LoraParams) -> None:
    weight_trains = not _is_frozen_projection(params.weight) and params.weight.requires_grad
    if weight_trains or (params.bias is not None and params.bias.requires_grad):
        raise ValueError("lora_mlp treats the projections' weight and bias as frozen; they must not require grad")


def lora_mlp(x: torch.Tensor, gate: LoraParams, up: LoraParams, down: LoraParams, activation: str = "silu") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with each projection a LoRA linear without dropout.

    Each of ``gate``, ``up``, ``down`` is a :class:`LoraParams` whose ``dropout_p`` is 0 and whose
    weight is a tensor or a frozen projection object that accepts x (``takes_input``). Same
    conventions as ``lora_linear``. activation: "silu" or "gelu_tanh".
    """
    check_activation(activation)
    gate, up, down = (LoraParams(*p) for p in (gate, up, down))
    for params in (gate, up, down):
        _check_frozen(params)
        if params.dropout_p:
            raise ValueError("lora_mlp has no dropout; use lora_linear per projection")
    if not takes_input(x, gate, up, down):
        raise ValueError(f"lora_mlp: a 4-bit projection does not compute in {x.dtype} here (its compute dtype "
                         "differs, or autocast is on); call the MLP's own forward")
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
