"""hf_compat: transformers' names asked in one place, and the architecture table."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import CAUSAL_LM_FAMILIES, tiny_bert_classifier, tiny_causal_lm, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit

import deltatune as dt
from deltatune import hf_compat


def test_cache_argument_is_the_name_the_installed_transformers_takes():
    for model in (tiny_llama(), tiny_gpt2(), tiny_bert_classifier()):
        name = hf_compat.cache_argument(model)
        declared = inspect.signature(type(model.base_model).forward).parameters
        assert name in hf_compat.CACHE_NAMES and name in declared, (type(model).__name__, name)


def test_cache_is_read_under_either_name_and_written_under_the_models_own():
    model, cache = tiny_llama(), object()
    for name in hf_compat.CACHE_NAMES:
        assert hf_compat.get_cache({name: cache}) is cache
    kwargs = {"past_key_values": None, "cache": None}
    hf_compat.set_cache(kwargs, model, cache)
    assert kwargs == {hf_compat.cache_argument(model): cache}


def test_a_model_outputs_cache_is_read_under_its_declared_name_only():
    """Reading a renamed field's old name from a transformers output logs a deprecation warning
    (5.24's ModelOutput aliases it): get_cache asks only for the names the output class declares."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    asked = []

    class Recording(BaseModelOutputWithPast):
        def get(self, key, default=None):
            asked.append(key)
            return super().get(key, default)

    declared = [name for name in hf_compat.CACHE_NAMES if name in BaseModelOutputWithPast.__dataclass_fields__]
    assert len(declared) == 1
    cache = object()
    assert hf_compat.get_cache(Recording(**{declared[0]: cache})) is cache
    assert hf_compat.get_cache(Recording()) is None  # training: no cache, and still no old name asked
    assert asked == declared * 2


def test_a_cache_filled_through_the_helpers_is_used_by_the_model():
    model = tiny_llama().eval()
    ids = torch.randint(0, 101, (1, 6))
    cache = hf_compat.new_cache(model.config)
    inputs = {"input_ids": ids[:, :5], "use_cache": True}
    hf_compat.set_cache(inputs, model, cache)
    with torch.no_grad():
        model(**inputs)
        assert hf_compat.cache_length(cache) == 5
        assert len(hf_compat.cache_key_values(cache)) == model.config.num_hidden_layers
        step = {"input_ids": ids[:, 5:], "use_cache": True}
        hf_compat.set_cache(step, model, cache)
        cached = model(**step).logits[:, -1]
        full = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_checkpointing_is_enabled_under_whichever_name_the_model_has():
    model = tiny_llama()
    assert not hf_compat.checkpointing_enabled(model)
    hf_compat.enable_checkpointing(model, {"use_reentrant": False})
    assert hf_compat.checkpointing_enabled(model)


def _first_block_input_needs_grad(model, ids) -> bool:
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).requires_grad),
        with_kwargs=True)
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    return seen[0]


def test_non_reentrant_checkpointing_leaves_the_frozen_embeddings_output_without_grad():
    """transformers 5 hooks the embeddings to make their output require grad whatever the
    checkpointing; only reentrant checkpointing needs it (else the first block differentiates its
    input for nothing). Hooks the user added before stay; gradients are the same either way."""
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 7))
    plain, reentrant, own = tiny_llama(), tiny_llama(), tiny_llama()
    for model in (plain, reentrant, own):
        model.load_state_dict(plain.state_dict())
        model.model.embed_tokens.weight.requires_grad_(False)
        model.train()
    own.enable_input_require_grads()
    hf_compat.enable_checkpointing(plain, {"use_reentrant": False})
    hf_compat.enable_checkpointing(reentrant, {"use_reentrant": True})
    hf_compat.enable_checkpointing(own, {"use_reentrant": False})
    assert not _first_block_input_needs_grad(plain, ids)
    assert _first_block_input_needs_grad(reentrant, ids) and _first_block_input_needs_grad(own, ids)
    assert len(own._require_grads_hooks) == 1  # the user's own, still in transformers' list
    for name, param in plain.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, dict(reentrant.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


def test_module_kinds():
    gpt2, llama = tiny_gpt2(), tiny_llama()
    assert hf_compat.is_conv1d(gpt2.transformer.h[0].attn.c_attn) and not hf_compat.is_conv1d(llama.lm_head)
    assert hf_compat.linear_out_features(gpt2.transformer.h[0].attn.c_attn) == 3 * 32
    assert hf_compat.is_norm(llama.model.norm) and hf_compat.is_silu(llama.model.layers[0].mlp.act_fn)


@pytest.mark.parametrize("build, family, encoder", [
    (tiny_llama, "llama", False), (tiny_gpt2, "gpt2", False), (tiny_bert_classifier, "bert", True),
    (tiny_t5, "t5", False), (tiny_vit, "vit", False),
])
def test_every_test_architecture_is_in_the_table(build, family, encoder):
    model = build()
    assert hf_compat.model_family(model) == family
    assert hf_compat.is_encoder_only(model) is encoder


def test_the_table_is_consistent_and_its_fused_classes_exist_in_this_transformers():
    seen = set()
    for arch in hf_compat.ARCHITECTURES:
        assert not seen & set(arch.model_types), f"{arch.family}: a model type listed twice"
        seen |= set(arch.model_types)
        for model_type in arch.fused or {}:
            assert model_type in arch.model_types
    # An upstream rename of a fusable class would silently drop the fused path: fail here instead.
    llama = tiny_llama()
    norm, mlp, attention = hf_compat.fused_classes(llama)
    assert type(llama.model.norm) is norm and type(llama.model.layers[0].mlp) is mlp
    assert type(llama.model.layers[0].self_attn) is attention
    assert hf_compat.fused_classes(tiny_gpt2()) is None


def test_an_encoder_without_table_names_gets_every_linear_layer():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    base = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    assert hf_compat.is_encoder_only(base)
    model = dt.wrap(base, dt.LoraConfig(r=2))
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in model.delta_layers()}
    assert {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"} <= wrapped and "classifier" not in wrapped


def test_block_variants_tell_sliding_window_layers_from_full_attention_ones():
    """The block graphs warm up once per block class, shape and variant: a Gemma-3 model's full-
    attention layer must not pass for one of its sliding-window layers, and a Llama's layers are one kind."""
    import transformers

    config = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4)
    layers = transformers.Gemma3ForCausalLM(config).model.layers
    variants = [hf_compat.block_variant(layer) for layer in layers]
    sliding = [getattr(layer.self_attn, "is_sliding", layer.self_attn.sliding_window is not None) for layer in layers]
    assert len(set(variants)) == 2 and False in sliding and True in sliding
    assert all((variants[i] == variants[j]) == (sliding[i] == sliding[j]) for i in range(7) for j in range(7))
    assert len({hf_compat.block_variant(layer) for layer in tiny_llama().model.layers}) == 1


@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_the_tables_shared_input_groups_get_one_input_tensor_in_this_transformers(family):
    # Mixed-batch decoding shares the siblings' LoRA shrink only for the very same input object:
    # if transformers stopped passing one tensor to q/k/v (or gate/up), the saving would vanish.
    model = tiny_causal_lm(family).eval()
    groups = hf_compat.shared_input_siblings(model)
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, args[0]))
               for group in groups for name in group]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    for handle in handles:
        handle.remove()
    blocks = model.config.num_hidden_layers
    expected = 2 * blocks if family != "phi3" else 0  # Phi-3 computes q/k/v and gate/up in one projection each
    assert len(groups) == expected
    for group in groups:
        assert all(seen[name] is seen[group[0]] for name in group), group
    assert hf_compat.shared_input_siblings(tiny_gpt2()) == []
