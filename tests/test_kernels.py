"""Fast paths in deltatune.kernels against their plain-autograd references.

Each test draws fresh random inputs and compares the forward output and every gradient by
relative error ||fast - ref|| / ||ref||: under 1e-5 in float32, under 1e-2 in bf16. On a machine
with CUDA the same tests also run there, which exercises the Triton kernels.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import CAUSAL_LM_FAMILIES, tiny_causal_lm
from torch.utils.checkpoint import checkpoint

from deltatune.kernels import (
    LoraParams,
    gated_activation,
    causal_lm_loss,
    chunked_cross_entropy,
    cross_entropy_reference,
    is_patched,
    lora_linear,
    patched_modules,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    patch_model_for_training,
    rms_norm,
    rms_norm_reference,
    rotary_embedding,
    rotary_embedding_reference,
    swiglu,
    swiglu_reference,
    unpatch_model,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    fast, ref = fast.double(), ref.double()
    return ((fast - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(*shape, dtype, device, scale=1.0, grad=True):
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype).requires_grad_(grad)


def run_with_grads(fn, inputs, grad_out_seed=0):
    """Output of fn(*inputs) and the gradients of every input that requires grad."""
    out = fn(*inputs)
    gen = torch.Generator(device=out.device).manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    tracked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, tracked, grad_out)
    return out, grads


def count_nodes(tensor, name_part):
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += name_part in type(node).__name__
        stack.extend(fn for fn, _ in node.next_functions)
    return count


def assert_same(fast, ref, dtype, what=""):
    err = rel_err(fast, ref)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


def clone_inputs(inputs):
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]


# ----------------------------------------------------------------------------- LoRA linear
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("adapter_dtype", ["same", "float32"])
def test_lora_linear_matches_reference(device, dtype, with_bias, adapter_dtype):
    torch.manual_seed(0)
    batch, seq, d_in, d_out, rank = 3, 17, 48, 40, 8
    a_dtype = dtype if adapter_dtype == "same" else torch.float32
    x = leaf(batch, seq, d_in, dtype=dtype, device=device)
    weight = leaf(d_out, d_in, dtype=dtype, device=device, scale=d_in**-0.5, grad=False)
    bias = leaf(d_out, dtype=dtype, device=device, grad=False) if with_bias else None
    lora_a = leaf(rank, d_in, dtype=a_dtype, device=device, scale=d_in**-0.5)
    # B random, not the zero init: a zero B would hide errors in A's and x's gradients
    lora_b = leaf(d_out, rank, dtype=a_dtype, device=device, scale=rank**-0.5)
    inputs = [x, weight, bias, lora_a, lora_b, 2.0]

    out, grads = run_with_grads(lora_linear, inputs)
    ref_out, ref_grads = run_with_grads(lora_linear_reference, clone_inputs(inputs))
    assert out.dtype == ref_out.dtype == dtype
    assert_same(out, ref_out, dtype, "output")
    for name, g, rg, src in zip(("x", "A", "B"), grads, ref_grads, (x, lora_a, lora_b)):
        assert g.dtype == src.dtype
        assert_same(g, rg, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_dropout_mask_is_regenerated_from_seed(device, dtype):
    torch.manual_seed(1)
    x = leaf(2, 9, 32, dtype=dtype, device=device)
    weight = leaf(24, 32, dtype=dtype, device=device, grad=False)
    lora_a = leaf(4, 32, dtype=dtype, device=device)
    lora_b = leaf(24, 4, dtype=dtype, device=device)

    def fast(*t):
        return lora_linear(*t, 0.5, 0.3, True, dropout_seed=1234)

    def ref(*t):
        return lora_linear_reference(*t, 0.5, 0.3, True, dropout_seed=1234)

    inputs = [x, weight, None, lora_a, lora_b]
    out, grads = run_with_grads(fast, inputs)
    ref_out, ref_grads = run_with_grads(ref, clone_inputs(inputs))
    assert_same(out, ref_out, dtype, "output")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")
    # the mask really drops: the LoRA term differs from the no-dropout one
    no_dropout = lora_linear(x, weight, None, lora_a, lora_b, 0.5)
    assert rel_err(out, no_dropout) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_eval_mode_ignores_dropout_and_frozen_parts_get_no_grad(device):
    torch.manual_seed(2)
    x = leaf(5, 16, dtype=torch.float32, device=device, grad=False)
    weight = leaf(12, 16, dtype=torch.float32, device=device, grad=False)
    lora_a = leaf(2, 16, dtype=torch.float32, device=device)
    lora_b = leaf(12, 2, dtype=torch.float32, device=device)
    out = lora_linear(x, weight, None, lora_a, lora_b, 1.0, dropout_p=0.5, training=False)
    ref = lora_linear_reference(x, weight, None, lora_a, lora_b, 1.0)
    assert_same(out, ref, torch.float32)
    out.sum().backward()
    assert weight.grad is None and x.grad is None and lora_a.grad is not None
    with pytest.raises(ValueError):
        lora_linear(x, weight.detach().requires_grad_(), None, lora_a, lora_b, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_under_activation_checkpointing(device):
    torch.manual_seed(3)
    x = leaf(4, 8, 32, dtype=torch.float32, device=device)
    weight = leaf(32, 32, dtype=torch.float32, device=device, grad=False)
    lora_a = leaf(4, 32, dtype=torch.float32, device=device)
    lora_b = leaf(32, 4, dtype=torch.float32, device=device)

    def block(inp):
        hidden = lora_linear(inp, weight, None, lora_a, lora_b, 2.0, dropout_p=0.2, training=True)
        return torch.tanh(hidden) * inp

    torch.manual_seed(10)
    plain = block(x)
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, lora_a, lora_b])
    torch.manual_seed(10)
    recomputed = checkpoint(block, x, use_reentrant=False)
    ckpt_grads = torch.autograd.grad(recomputed.square().sum(), [x, lora_a, lora_b])
    assert_same(recomputed, plain, torch.float32)
    for g, rg in zip(ckpt_grads, plain_grads):
        assert_same(g, rg, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_mlp_matches_reference(device, dtype, with_bias, activation):
    torch.manual_seed(13)
    hidden, inner = 40, 96
    x = leaf(2, 9, hidden, dtype=dtype, device=device)

    def projection(d_in, d_out, rank, scaling):
        weight = leaf(d_out, d_in, dtype=dtype, device=device, scale=d_in**-0.5, grad=False)
        bias = leaf(d_out, dtype=dtype, device=device, grad=False) if with_bias else None
        lora_a = leaf(rank, d_in, dtype=torch.float32, device=device, scale=d_in**-0.5)
        lora_b = leaf(d_out, rank, dtype=torch.float32, device=device, scale=rank**-0.5)
        return [weight, bias, lora_a, lora_b, scaling]

    gate, up, down = projection(hidden, inner, 4, 2.0), projection(hidden, inner, 6, 0.5), projection(inner, hidden, 4, 1.5)
    inputs = [x, *gate, *up, *down]

    def split(args):
        return args[0], args[1:6], args[6:11], args[11:16]

    out, grads = run_with_grads(lambda *a: lora_mlp(*split(a), activation=activation), inputs)
    ref_out, ref_grads = run_with_grads(lambda *a: lora_mlp_reference(*split(a), activation), clone_inputs(inputs))
    assert_same(out, ref_out, dtype, "output")
    assert len(grads) == 7
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_cross_entropy_matches_reference(device, dtype, train_head, softcap):
    """Also with Gemma-2's final-logit softcapping (a cap low enough to bend these logits)."""
    torch.manual_seed(4)
    batch, seq, hidden_size, vocab = 3, 21, 32, 301
    hidden = leaf(batch, seq, hidden_size, dtype=dtype, device=device)
    head = leaf(vocab, hidden_size, dtype=dtype, device=device, scale=3 * hidden_size**-0.5, grad=train_head)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[torch.rand(batch, seq, device=device) < 0.3] = -100

    def fast(h, w):
        return chunked_cross_entropy(h, w, labels, chunk_size=16, softcap=softcap)  # 63 rows: a ragged last chunk

    def ref(h, w):
        return cross_entropy_reference(h, w, labels, softcap=softcap)

    loss, grads = run_with_grads(fast, [hidden, head])
    ref_loss, ref_grads = run_with_grads(ref, clone_inputs([hidden, head]))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_same(loss, ref_loss, dtype, "loss")
    assert len(grads) == len(ref_grads) == (2 if train_head else 1)
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_cross_entropy_all_ignored_is_nan_like_torch(device):
    hidden = torch.randn(2, 5, 8, device=device)
    head = torch.randn(11, 8, device=device)
    labels = torch.full((2, 5), -100, device=device)
    assert torch.isnan(chunked_cross_entropy(hidden, head, labels))
    assert torch.isnan(cross_entropy_reference(hidden, head, labels))


def tiny_llama(vocab=97, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_lm_loss_matches_hf_loss_and_grads(device):
    torch.manual_seed(5)
    model = tiny_llama().to(device)
    input_ids = torch.randint(0, 97, (2, 13), device=device)
    labels = input_ids.clone()
    labels[0, :4] = -100

    ref_loss = model(input_ids=input_ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    loss = causal_lm_loss(model, input_ids, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert_same(loss, ref_loss, torch.float32, "loss")
    for (name, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
        assert_same(g, rg, torch.float32, name)


def test_causal_lm_loss_unwraps_a_wrapper_exposing_model():
    torch.manual_seed(6)
    model = tiny_llama()

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    input_ids = torch.randint(0, 97, (1, 9))
    expected = model(input_ids=input_ids, labels=input_ids).loss
    assert_same(causal_lm_loss(Wrapper(model), input_ids, input_ids), expected, torch.float32)


# ----------------------------------------------------------------------------- fused block ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_matches_reference(device, dtype, train_weight):
    torch.manual_seed(7)
    x = leaf(3, 11, 96, dtype=dtype, device=device, scale=3.0)
    weight = (1.0 + 0.1 * torch.randn(96, device=device)).to(dtype).requires_grad_(train_weight)
    out, grads = run_with_grads(lambda a, w: rms_norm(a, w, 1e-6), [x, weight])
    ref_out, ref_grads = run_with_grads(lambda a, w: rms_norm_reference(a, w, 1e-6), clone_inputs([x, weight]))
    assert_same(out, ref_out, dtype, "output")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_unit_offset_rms_norm_is_gemmas(device, dtype, train_weight):
    """unit_offset=True computes transformers' Gemma RMSNorm: scaled by (1 + w) in float32."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    torch.manual_seed(7)
    norm = Gemma2RMSNorm(96, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(96))
    norm.weight.requires_grad_(train_weight)
    x = leaf(3, 11, 96, dtype=dtype, device=device, scale=3.0)
    out, grads = run_with_grads(lambda a, w: rms_norm(a, w, 1e-6, unit_offset=True), [x, norm.weight])
    ref_out, ref_grads = run_with_grads(lambda a, w: torch.func.functional_call(norm, {"weight": w}, (a,)),
                                        clone_inputs([x, norm.weight]))
    assert_same(out, ref_out, dtype, "output")
    assert len(grads) == 1 + train_weight
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(device, dtype):
    torch.manual_seed(8)
    gate = leaf(4, 7, 130, dtype=dtype, device=device, scale=2.0)
    up = leaf(4, 7, 130, dtype=dtype, device=device)
    out, grads = run_with_grads(swiglu, [gate, up])
    ref_out, ref_grads = run_with_grads(swiglu_reference, clone_inputs([gate, up]))
    assert_same(out, ref_out, dtype, "output")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_recomputation_differentiated_once_writes_the_gated_gradients_over_gate_and_up(device, dtype):
    """Inside differentiated_once, fresh gate and up are overwritten by their own gradients (the
    memory an MLP's backward saves); the gradients are those of the ordinary path."""
    from deltatune.kernels.recompute import differentiated_once, mark_fresh

    torch.manual_seed(8)
    a = leaf(3, 5, 64, dtype=dtype, device=device)
    b = leaf(3, 5, 64, dtype=dtype, device=device)

    def run(once: bool):
        a_, b_ = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        with differentiated_once() if once else contextlib.nullcontext():
            gate, up = mark_fresh(a_ * 2.0), mark_fresh(b_ + 1.0)
            out = swiglu(gate, up)
        places = (gate.data_ptr(), up.data_ptr())
        holders = []
        gate.register_hook(lambda g: holders.append(g.data_ptr()))
        up.register_hook(lambda g: holders.append(g.data_ptr()))
        grads = torch.autograd.grad(out, [a_, b_], torch.ones_like(out))
        return grads, places, holders

    plain, plain_places, plain_holders = run(once=False)
    reused, places, holders = run(once=True)
    for g, ref in zip(reused, plain):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
    assert sorted(holders) == sorted(places)  # the gradients live where gate and up were
    assert not set(plain_holders) & set(plain_places)


def test_gated_inputs_that_are_not_fresh_or_saved_elsewhere_are_never_overwritten_silently():
    from deltatune.kernels.recompute import differentiated_once, mark_fresh

    torch.manual_seed(9)
    gate, up = leaf(4, 32, dtype=torch.float32, device="cpu"), leaf(4, 32, dtype=torch.float32, device="cpu")
    kept = (gate.detach().clone(), up.detach().clone())
    with differentiated_once():  # leaves the caller owns: not marked fresh, left as they are
        out = swiglu(gate, up)
    out.sum().backward()
    assert torch.equal(gate.detach(), kept[0]) and torch.equal(up.detach(), kept[1])
    # another node saved the same memory and reads it after the overwrite: autograd's error, not wrong gradients
    scale = leaf(4, 32, dtype=torch.float32, device="cpu")
    with differentiated_once():
        fresh_gate, fresh_up = mark_fresh(gate * 1.0), mark_fresh(up * 1.0)
        other = fresh_gate * scale  # made first, so its backward runs after the gated one
        out = swiglu(fresh_gate, fresh_up)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + other.sum()).backward()


@pytest.mark.parametrize("device", DEVICES)
def test_lora_mlp_recomputed_once_gives_the_same_gradients(device):
    from deltatune.kernels.recompute import differentiated_once

    torch.manual_seed(10)
    hidden, inner = 32, 64

    def projection(d_in, d_out):
        return LoraParams(leaf(d_out, d_in, dtype=torch.float32, device=device, scale=d_in**-0.5, grad=False), None,
                          leaf(4, d_in, dtype=torch.float32, device=device), leaf(d_out, 4, dtype=torch.float32, device=device),
                          2.0)

    gate, up, down = projection(hidden, inner), projection(hidden, inner), projection(inner, hidden)
    x = leaf(2, 7, hidden, dtype=torch.float32, device=device)
    tracked = [x, gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b]

    def grads(once: bool):
        with differentiated_once() if once else contextlib.nullcontext():
            out = lora_mlp(x, gate, up, down)
        return torch.autograd.grad(out, tracked, torch.ones_like(out))

    for g, ref in zip(grads(once=True), grads(once=False)):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_is_gemmas_activation_times_up(device, dtype):
    """gated_activation(..., "gelu_tanh") computes Gemma's act_fn(gate) * up, gradients included."""
    from transformers.activations import ACT2FN

    from deltatune import hf_compat

    act_fn = ACT2FN["gelu_pytorch_tanh"]
    assert hf_compat.gated_activation(act_fn) == "gelu_tanh" and hf_compat.gated_activation(ACT2FN["silu"]) == "silu"
    assert hf_compat.gated_activation(ACT2FN["gelu"]) is None  # the exact erf GELU is not fused
    torch.manual_seed(8)
    gate = leaf(4, 7, 130, dtype=dtype, device=device, scale=3.0)
    up = leaf(4, 7, 130, dtype=dtype, device=device)
    out, grads = run_with_grads(lambda g, u: gated_activation(g, u, "gelu_tanh"), [gate, up])
    ref_out, ref_grads = run_with_grads(lambda g, u: act_fn(g) * u, clone_inputs([gate, up]))
    assert_same(out, ref_out, dtype, "output")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")
    with pytest.raises(ValueError, match="silu, gelu_tanh"):
        gated_activation(gate, up, "relu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rotary_embedding_matches_reference(device, dtype, layout):
    torch.manual_seed(9)
    batch, heads, seq, dim = 2, 6, 13, 32
    if layout == "transposed":  # what HF attention passes: (B, S, H, D) viewed as (B, H, S, D)
        x = leaf(batch, seq, heads, dim, dtype=dtype, device=device).detach().transpose(1, 2).requires_grad_()
    else:
        x = leaf(batch, heads, seq, dim, dtype=dtype, device=device)
    angles = torch.randn(batch, seq, dim // 2, device=device).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out, grads = run_with_grads(lambda t: rotary_embedding(t, cos, sin), [x])
    ref_out, ref_grads = run_with_grads(lambda t: rotary_embedding_reference(t, cos, sin), clone_inputs([x]))
    assert_same(out, ref_out, dtype, "output")
    assert_same(grads[0], ref_grads[0], dtype, "grad")


# ----------------------------------------------------------------------------- model patch
def forward_backward(model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_model_is_equivalent_reversible_and_idempotent(device, dtype):
    from transformers.models.llama import modeling_llama

    torch.manual_seed(11)
    model = tiny_llama().to(device=device, dtype=dtype)
    reference = copy.deepcopy(model)
    original_rotary = modeling_llama.apply_rotary_pos_emb
    classes_before = [type(m) for m in model.modules()]
    keys_before = list(model.state_dict())
    input_ids = torch.randint(0, 97, (2, 16), device=device)

    patch_model_for_training(model)
    patch_model_for_training(model)  # idempotent
    assert is_patched(model)
    # norms (2 per block + final), MLPs, attentions (for the rotary) and the blocks themselves (CUDA
    # graphs under checkpointing); the modeling file is untouched
    assert sum(type(m) is not c for m, c in zip(model.modules(), classes_before)) == 2 * 2 + 1 + 2 + 2 + 2
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert list(model.state_dict()) == keys_before

    loss, grads = forward_backward(model, input_ids)
    ref_loss, ref_grads = forward_backward(reference, input_ids)
    assert_same(loss, ref_loss, dtype, "loss")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, dtype, "grad")

    unpatch_model(model)
    unpatch_model(model)
    assert not is_patched(model)
    assert [type(m) for m in model.modules()] == classes_before


def test_patch_is_scoped_to_the_patched_model(monkeypatch):
    """The fused rotary runs in the patched model's attention only; another model and the modeling
    file are untouched, and the second model computes bit for bit what it did before."""
    from deltatune.kernels import patch as patch_module
    from transformers.models.llama import modeling_llama

    calls = []
    fused_rotary = patch_module.rotary_embedding
    monkeypatch.setattr(patch_module, "rotary_embedding", lambda *a: calls.append(1) or fused_rotary(*a))
    module_dict = dict(vars(modeling_llama))
    first, second = tiny_llama(), tiny_llama()
    input_ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = second(input_ids=input_ids).logits
        patch_model_for_training(first)
        first(input_ids=input_ids)
        assert len(calls) == 2 * 2  # q and k in each of the 2 blocks
        assert torch.equal(second(input_ids=input_ids).logits, before)
        assert len(calls) == 4
    assert all(vars(modeling_llama)[k] is v for k, v in module_dict.items())
    assert [type(m) for m in second.modules()] == [type(m) for m in tiny_llama().modules()]
    unpatch_model(first)


def test_patched_model_with_lora_linears_trains_like_reference():
    """The fused MLP calls LoRA-wrapped projections as modules; gradients reach the adapters."""
    torch.manual_seed(12)

    class LoraProjection(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, rank: int, fast: bool):
            super().__init__()
            self.base = base.requires_grad_(False)
            self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
            self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.1)
            self.fast = fast

        def forward(self, x):
            fn = lora_linear if self.fast else lora_linear_reference
            return fn(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, 2.0)

        def lora_fast_path_params(self):
            # the protocol a LoRA layer offers so that the patched MLP fuses all three projections
            return LoraParams(self.base.weight, self.base.bias, self.lora_a, self.lora_b, 2.0) if self.fast else None

    def adapt(model, fast):
        model.requires_grad_(False)
        for layer in model.model.layers:
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    setattr(parent, name, LoraProjection(getattr(parent, name), 4, fast))
        return model

    base = tiny_llama()
    fast_model = patch_model_for_training(adapt(copy.deepcopy(base), fast=True))
    ref_model = adapt(copy.deepcopy(base), fast=False)
    ref_model.load_state_dict(fast_model.state_dict())
    input_ids = torch.randint(0, 97, (2, 12))
    loss = causal_lm_loss(fast_model, input_ids, input_ids)
    grads = torch.autograd.grad(loss, [p for p in fast_model.parameters() if p.requires_grad])
    ref_loss, ref_grads = forward_backward(ref_model, input_ids)
    assert len(grads) == 2 * 7 * 2
    assert count_nodes(loss, "LoraMLPFunction") == 2 and count_nodes(loss, "LoraLinearFunction") == 2 * 4
    assert_same(loss, ref_loss, torch.float32, "loss")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, torch.float32, "grad")
    unpatch_model(fast_model)


# ----------------------------------------------------------------------------- labels= through the chunked loss
@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_labels_forward_gives_the_models_own_loss_and_gradients(family, tied):
    import deltatune as dt

    torch.manual_seed(7)
    model = tiny_causal_lm(family, tied)
    wrapped = dt.wrap(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    wrapped.train()
    input_ids = torch.randint(0, 97, (2, 11))
    labels = input_ids.clone()
    labels[0, :5] = -100  # a masked prompt
    trainable = [p for p in wrapped.parameters() if p.requires_grad]

    fast = wrapped(input_ids=input_ids, labels=labels)
    assert fast.logits is None  # no float32 logits were made
    fast_grads = torch.autograd.grad(fast.loss, trainable)
    reference = wrapped.model(input_ids=input_ids, labels=labels)  # the model's own forward and loss
    assert reference.logits is not None
    ref_grads = torch.autograd.grad(reference.loss, trainable)
    assert_same(fast.loss, reference.loss, torch.float32, "loss")
    for g, rg in zip(fast_grads, ref_grads):
        assert_same(g, rg, torch.float32, "grad")

    # Trainer's num_items_in_batch (gradient accumulation) divides the summed loss, as the model's does.
    fast = wrapped(input_ids=input_ids, labels=labels, num_items_in_batch=40)
    reference = wrapped.model(input_ids=input_ids, labels=labels, num_items_in_batch=40)
    assert_same(fast.loss, reference.loss, torch.float32, "loss / num_items_in_batch")


def test_labels_forward_steps_aside_where_the_models_forward_is_needed():
    import deltatune as dt

    torch.manual_seed(8)
    input_ids = torch.randint(0, 97, (2, 9))
    wrapped = dt.wrap(tiny_causal_lm("llama"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped.eval()  # evaluation wants logits (metrics, generation)
    assert wrapped(input_ids=input_ids, labels=input_ids).logits is not None
    wrapped.train()
    with torch.no_grad():
        assert wrapped(input_ids=input_ids, labels=input_ids).logits is not None
    assert wrapped(input_ids=input_ids).logits is not None  # no labels: the caller wants logits
    unfused = dt.wrap(tiny_causal_lm("llama"), dt.LoraConfig(r=4, target_modules=["q_proj"]), fused=False)
    unfused.train()
    assert unfused(input_ids=input_ids, labels=input_ids).logits is not None  # fused=False: the plain path
    # Soft prompts rewrite inputs and labels in hooks on the model: its own forward runs them.
    prompted = dt.wrap(tiny_causal_lm("llama"), dt.PromptTuningConfig(num_virtual_tokens=3))
    prompted.train()
    out = prompted(input_ids=input_ids, labels=input_ids)
    assert out.logits is not None and out.logits.shape[1] == 9 and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- the fused block path, per family
@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_fused_block_path_per_family_equals_the_models_own(family):
    """dt.wrap(..., fused=True) on each family in the table runs fused norms, the one-node LoRA MLP
    (SwiGLU or GeGLU; Phi-3's from its gate_up_proj halves) and rotary, and gives the unfused
    model's loss and every adapter gradient."""
    import deltatune as dt

    torch.manual_seed(21)
    base = tiny_causal_lm(family)
    config = dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    input_ids = torch.randint(0, 97, (2, 11))
    reference = dt.wrap(copy.deepcopy(base), config, fused=False)
    reference.train()
    fast = dt.wrap(copy.deepcopy(base), config, fused=True)
    fast.load_state_dict(reference.state_dict())
    fast.train()
    assert fast.is_fused and not reference.is_fused
    roles = {type(m).__mro__[1].__name__ for m in patched_modules(fast.model)}
    # norms, MLPs, attentions and the blocks (CUDA graphs under checkpointing, eager on a CPU)
    assert {name for name in roles if name.endswith(("RMSNorm", "MLP", "Attention", "Layer"))} == roles and len(roles) == 4
    trainable = [p for p in fast.parameters() if p.requires_grad]
    loss = fast(input_ids=input_ids, labels=input_ids).loss
    assert count_nodes(loss, "LoraMLPFunction") == 2  # one per block: gate, up and down in one node
    grads = torch.autograd.grad(loss, trainable)
    ref_loss = reference(input_ids=input_ids, labels=input_ids).loss
    ref_grads = torch.autograd.grad(ref_loss, [p for p in reference.parameters() if p.requires_grad])
    projections = 4 if family == "phi3" else 7  # qkv_proj, o_proj, gate_up_proj, down_proj
    assert len(grads) == len(ref_grads) == 2 * projections * 2
    assert_same(loss, ref_loss, torch.float32, "loss")
    for g, rg in zip(grads, ref_grads):
        assert_same(g, rg, torch.float32, "grad")
