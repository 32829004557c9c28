"""The method families beside LoRA: bottleneck adapters, IA3, BitFit, Fisher-sparse, LayerNorm
tuning and partial fine-tuning. Acceptance tests run for every method; then each method's own."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from conftest import (
    frozen_snapshot, randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_mlp, tiny_t5,
    tiny_vit, token_batch, train_steps,
)
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer

MY_METHODS = ["adapter", "bitfit", "fisher", "ia3", "layernorm", "partial"]

# Configs used by the acceptance tests, on tiny_llama unless a test says otherwise.
CASES = {
    "adapter-houlsby": ("adapter", {"placement": "houlsby", "reduction_factor": 4, "layer_norm": True}),
    "adapter-pfeiffer": ("adapter", {"placement": "pfeiffer", "reduction_factor": 4, "layer_norm": True, "nonlinearity": "gelu"}),
    "adapter-parallel": ("adapter", {"placement": "parallel", "reduction_factor": 4}),
    "ia3": ("ia3", {}),
    "bitfit": ("bitfit", {"add_missing_biases": True}),
    "fisher": ("fisher", {"density": 0.2, "fisher_batches": 2}),
    "layernorm": ("layernorm", {}),
    "partial": ("partial", {"last_k_layers": 1}),
}
MERGEABLE = ["ia3", "bitfit", "fisher", "layernorm", "partial"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and many times faster when other jobs share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def lm_batch(tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    tokens = token_batch() if tokens is None else tokens
    return {"input_ids": tokens, "labels": tokens}


def wrap_case(base: nn.Module, case: str, batch: dict | None = None, adapter_name: str = "default") -> dt.DeltaModel:
    method, fields = CASES[case]
    kwargs = {"calibration_data": [batch or lm_batch()] * 2} if method == "fisher" else {}
    return dt.wrap(base, dt.make_config(method, **fields), adapter_name=adapter_name, **kwargs)




def adapter_param_ids(model: dt.DeltaModel, adapter_name: str = "default") -> set[int]:
    return {id(p) for _, layer in model.delta_layers() for p in layer.adapter_parameters(adapter_name)}


def wrapped_names(model: dt.DeltaModel, layer_type: type = DeltaLayer) -> list[str]:
    return sorted(n for n, m in model.model.named_modules() if isinstance(m, layer_type))


# == acceptance, every method =====================================================================
@pytest.mark.parametrize("case", list(CASES))
def test_base_stays_bit_identical_and_gradients_reach_only_the_method(case):
    model = wrap_case(tiny_llama(), case)
    randomize_adapters(model)  # so that zero-initialised parts pass gradients on too
    before = frozen_snapshot(model)
    model.train()
    model(**lm_batch()).loss.backward()
    method_params = adapter_param_ids(model)
    assert method_params
    for name, param in model.named_parameters():
        if id(param) in method_params:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    train_steps(model, lambda m: m(**lm_batch()).loss, steps=3, lr=1e-2, train_mode=True)
    after = frozen_snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _arch_batch(base: nn.Module) -> dict[str, torch.Tensor]:
    kind = type(base).__name__
    if "ViT" in kind:
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 2, 1])}
    if "Bert" in kind:
        return {"input_ids": token_batch(), "labels": torch.tensor([0, 1, 2, 1])}
    return lm_batch()


@pytest.mark.parametrize("method", MY_METHODS)
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_classifier, tiny_vit])
def test_comparison_defaults_work_on_every_architecture_and_start_unchanged(method, build):
    # What `deltatune compare` does: registered compare_defaults, the head as modules_to_save.
    base = build()
    batch = _arch_batch(base)
    fields = {k: v for k, v in dt.method_info(method).compare_defaults.items() if k != "lr"}
    if hasattr(base, "classifier"):
        fields["modules_to_save"] = ["classifier"]
    kwargs = {"calibration_data": [batch]} if dt.method_info(method).needs_calibration_data else {}
    with torch.no_grad():
        reference = base(**batch).logits
        model = dt.wrap(base, dt.make_config(method, **fields), **kwargs)
        assert torch.equal(model(**batch).logits, reference)
    model.train()
    model(**batch).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    report = model.trainable_parameters().by_method
    # Partial fine-tuning's copies are reported as modules_to_save until the core labels them by method.
    assert report.get(method, 0) > 0 or (method == "partial" and report.get("modules_to_save", 0) > 0)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trips_bit_exact(case, tmp_path):
    model = wrap_case(tiny_llama(), case)
    randomize_adapters(model)
    model.eval()
    tokens = token_batch()
    out = model(input_ids=tokens).logits
    path = model.save(tmp_path / case)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == dt.method_info(CASES[case][0]).config_class.peft_type
    loaded = dt.load(tiny_llama(), path)
    saved, restored = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys() and saved
    assert all(torch.equal(saved[k], restored[k]) and saved[k].dtype == restored[k].dtype for k in saved)
    assert torch.equal(loaded(input_ids=tokens).logits, out)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = dt.load(tiny_llama(), path, is_trainable=True)
    assert trainable.trainable_parameters().trainable == model.trainable_parameters().trainable


# A tiny language: 5 tokens with a fixed successor rule (t -> t+3 mod 5), which the frozen random
# model cannot do at start. The head is scaled up: at init scale 0.02 it caps logits near zero.
TOY_TOKENS = ((torch.arange(0, 64) * 3) % 5).reshape(4, 16)
TOY_SETUPS = {  # case: (model, learning rate, steps)
    "adapter-houlsby": (tiny_llama, 1e-2, 20),
    "adapter-pfeiffer": (tiny_llama, 1e-2, 20),
    "adapter-parallel": (tiny_llama, 1e-2, 20),
    "ia3": (tiny_llama, 4e-1, 50),
    "bitfit": (tiny_gpt2, 5e-2, 50),  # GPT-2's own biases, LayerNorm ones included
    "fisher": (tiny_llama, 1e-2, 20),
    "layernorm": (tiny_llama, 1e-1, 20),
    "partial": (tiny_llama, 1e-2, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_learns_a_toy_task(case):
    build, lr, steps = TOY_SETUPS[case]
    base = build()
    with torch.no_grad():
        base.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    model = wrap_case(base, case, batch=lm_batch(TOY_TOKENS))
    losses = train_steps(model, lambda m: m(**lm_batch(TOY_TOKENS)).loss, steps=steps, lr=lr, train_mode=True)
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize("case", MERGEABLE)
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_and_unmerge_are_exact_to_float32_precision(case, build):
    base = build()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = wrap_case(base, case)
    randomize_adapters(model)
    tokens = token_batch()
    unmerged = model(input_ids=tokens).logits
    model.merge()
    assert relative_error(model(input_ids=tokens).logits, unmerged) < 1e-5
    model.unmerge()
    assert relative_error(model(input_ids=tokens).logits, unmerged) < 1e-5
    for name, layer in model.delta_layers():
        restored = layer.get_base_layer().state_dict()
        assert restored.keys() == {k.removeprefix(name + ".") for k in original if k.startswith(name + ".")}
        for key, value in restored.items():
            assert torch.allclose(value, original[f"{name}.{key}"], rtol=1e-5, atol=1e-6), (name, key)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert relative_error(plain(input_ids=tokens).logits, unmerged) < 1e-5


def test_merging_bottleneck_adapters_is_a_clear_error():
    model = wrap_case(tiny_llama(), "adapter-houlsby")
    randomize_adapters(model)
    tokens = token_batch()
    out = model(input_ids=tokens).logits
    with pytest.raises(TypeError, match=r"'default' \(adapter\) cannot be merged"):
        model.merge()
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(model(input_ids=tokens).logits, out)


def test_every_method_is_registered_with_comparison_defaults():
    for method in MY_METHODS:
        info = dt.method_info(method)
        assert info.compare_defaults["lr"] > 0
        dt.make_config(method, **{k: v for k, v in info.compare_defaults.items() if k != "lr"})
        assert getattr(dt, info.config_class.__name__) is info.config_class
    assert dt.method_info("fisher").needs_calibration_data
    assert not dt.method_info("adapter").mergeable
    assert all(dt.method_info(m).mergeable for m in MERGEABLE)


# == bottleneck adapters ==========================================================================
@pytest.mark.parametrize(
    "build, attention_output, ffn_output, ffn_block",
    [
        (tiny_llama, "self_attn.o_proj", "mlp.down_proj", "mlp"),
        (tiny_gpt2, "attn.c_proj", "mlp.c_proj", "mlp"),
        (tiny_bert_classifier, "attention.output.dense", "output.dense", "output"),
        (tiny_vit, "attention.o_proj", "mlp.fc2", "mlp"),  # transformers >= 5 names
    ],
)
def test_adapter_placements_wrap_the_documented_modules(build, attention_output, ffn_output, ffn_block):
    def inside_blocks(placement: str) -> list[str]:
        names = wrapped_names(dt.wrap(build(), dt.BottleneckConfig(placement=placement)))
        paths = [re.sub(r".*\.(?:layers|layer|h)\.(\d+)\.", r"\1:", n) for n in names]
        return sorted(paths)

    assert inside_blocks("houlsby") == sorted(f"{i}:{m}" for i in (0, 1) for m in (attention_output, ffn_output))
    assert inside_blocks("pfeiffer") == [f"0:{ffn_output}", f"1:{ffn_output}"]
    assert inside_blocks("parallel") == [f"0:{ffn_block}", f"1:{ffn_block}"]


def test_houlsby_adds_the_adapter_to_the_projection_output():
    model = dt.wrap(tiny_llama(), dt.BottleneckConfig(placement="houlsby", reduction_factor=4, layer_norm=True, scaling=2.0))
    randomize_adapters(model)
    layer = model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, 32)
    h = layer.base_layer(x)
    adapter = layer.bottleneck["default"]
    expected = h + 2.0 * adapter.up(torch.relu(adapter.down(adapter.layer_norm(h))))
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert adapter.down.out_features == 8  # hidden 32 / reduction_factor 4


def test_parallel_adapter_on_bert_adds_to_the_ffn_output_before_the_layernorm():
    model = dt.wrap(tiny_bert_classifier(), dt.BottleneckConfig(placement="parallel", nonlinearity="gelu"))
    randomize_adapters(model)
    wrapper = model.model.bert.encoder.layer[0].output
    output_module, adapter = wrapper.base_layer, wrapper.bottleneck["default"]
    intermediate, residual = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    expected = output_module.LayerNorm(output_module.dense(intermediate) + adapter(residual) + residual)
    assert torch.allclose(wrapper(intermediate, residual), expected, atol=1e-6)
    assert torch.allclose(wrapper(intermediate, input_tensor=residual), expected, atol=1e-6)


def test_adapter_on_an_unknown_architecture_asks_for_target_modules():
    with pytest.raises(dt.ConfigError, match="give target_modules"):
        dt.wrap(tiny_mlp(), dt.BottleneckConfig())
    base, x = tiny_mlp(), torch.randn(5, 8)
    reference = base(x)
    model = dt.wrap(base, dt.BottleneckConfig(target_modules=["2"], reduction_factor=8))
    assert wrapped_names(model) == ["2"]
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("bad, message", [
    ({"placement": "sideways"}, "placement must be one of"),
    ({"reduction_factor": 0}, "reduction_factor must be a positive integer"),
    ({"nonlinearity": "sigmoidish"}, "nonlinearity must be one of"),
])
def test_bottleneck_config_errors_name_the_field(bad, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.BottleneckConfig(**bad)


# == IA3 ==========================================================================================
def test_ia3_scales_keys_values_and_the_ffn_activation_with_ones_at_init():
    model = dt.wrap(tiny_llama(), dt.IA3Config())
    layer = model.model.model.layers[0]
    assert wrapped_names(model) == sorted(f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"))
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # 2 kv heads x 8: an output scale
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # the intermediate activation: an input scale
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "ia3_l" in n)
    randomize_adapters(model)
    x = torch.randn(3, 64)
    down = layer.mlp.down_proj
    assert torch.allclose(down(x), down.base_layer(x * down.ia3_l["default"].flatten()), atol=1e-6)
    k = layer.self_attn.k_proj
    assert torch.allclose(k(x[:, :32]), k.base_layer(x[:, :32]) * k.ia3_l["default"].flatten(), atol=1e-6)


def test_ia3_files_move_both_ways_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    tokens = token_batch()
    ours = dt.wrap(tiny_llama(), dt.IA3Config())
    randomize_adapters(ours)
    ours.eval()
    ours.save(tmp_path / "ours")
    with warnings.catch_warnings():  # peft warns that it ignores our None-valued layers_* fields
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(theirs(input_ids=tokens).logits, ours(input_ids=tokens).logits, atol=1e-6)

    peft_model = peft.get_peft_model(tiny_llama(), peft.IA3Config(task_type="CAUSAL_LM"))
    randomize_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = dt.load(tiny_llama(), tmp_path / "theirs")
    assert torch.allclose(loaded(input_ids=tokens).logits, peft_model(input_ids=tokens).logits, atol=1e-6)


def test_ia3_needs_targets_on_unknown_architectures_and_checks_feedforward_subset():
    with pytest.raises(dt.ConfigError, match="IA3 has no default targets"):
        dt.wrap(tiny_mlp(), dt.IA3Config())
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules \['fc2'\] are not in target_modules"):
        dt.IA3Config(target_modules=["k"], feedforward_modules=["fc2"])
    model = dt.wrap(tiny_mlp(), dt.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    assert model.model[0].ia3_l["default"].shape == (32, 1) and model.model[2].ia3_l["default"].shape == (1, 32)


# == BitFit =======================================================================================
def test_bitfit_on_a_model_without_biases_says_so_and_can_add_them():
    with pytest.raises(dt.ConfigError, match="no bias terms.*add_missing_biases=True"):
        dt.wrap(tiny_llama(), dt.BitFitConfig())
    base = tiny_llama()
    with pytest.raises(dt.ConfigError, match=r"have no bias, e.g. \['model.layers.0.self_attn.q_proj'.*add_missing_biases=True"):
        dt.wrap(base, dt.BitFitConfig(target_modules=["q_proj"]))
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())  # refused before wrapping anything
    model = dt.wrap(tiny_llama(), dt.BitFitConfig(add_missing_biases=True))
    assert len(wrapped_names(model)) == 2 * 7  # every linear layer but lm_head
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if p.requires_grad)
    randomize_adapters(model)
    model.merge()
    q_proj = model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(q_proj.bias, nn.Parameter) and not q_proj.bias.requires_grad
    model.unmerge()
    assert q_proj.bias is None


def test_bitfit_trains_only_the_chosen_biases():
    base = tiny_bert_classifier()
    model = dt.wrap(base, dt.BitFitConfig(target_modules=["query", "intermediate.dense"]))
    assert [n.split(".", 4)[-1] for n in wrapped_names(model)] == ["attention.self.query", "intermediate.dense"] * 2
    expected = sum(m.get_base_layer().bias.numel() for _, m in model.delta_layers())
    assert model.trainable_parameters().trainable == model.trainable_parameters().by_method["bitfit"] == expected


def test_bitfit_default_covers_every_bias_but_the_head():
    model = dt.wrap(tiny_gpt2(), dt.BitFitConfig())
    leaves = {n.split(".", 3)[-1] for n in wrapped_names(model)}
    assert leaves == {"ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "ln_f"}
    biases = [p for n, p in tiny_gpt2().named_parameters() if n.endswith("bias")]
    assert model.trainable_parameters().trainable == sum(b.numel() for b in biases)
    bert = dt.wrap(tiny_bert_classifier(), dt.BitFitConfig(modules_to_save=["classifier"]))
    report = bert.trainable_parameters().by_method
    biases = [p for n, p in tiny_bert_classifier().named_parameters() if n.endswith("bias") and not n.startswith("classifier")]
    assert report["bitfit"] == sum(b.numel() for b in biases) and report["modules_to_save"] == 32 * 3 + 3


def test_bitfit_on_a_convolution_adds_per_channel():
    model = dt.wrap(tiny_vit(), dt.BitFitConfig(target_modules=["projection"]))
    randomize_adapters(model)
    layer = model.model.vit.embeddings.patch_embeddings.projection
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(layer(x), layer.base_layer(x) + layer.bias_delta["default"].view(-1, 1, 1), atol=1e-6)


# == Fisher-sparse ================================================================================
def _manual_fisher(base: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    weights = {n: p for n, p in base.named_parameters() if n.endswith("proj.weight")}
    scores = {n: torch.zeros_like(p) for n, p in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(base(**batch).loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            scores[name] += grad.square() / len(batches)
    return scores


def test_fisher_keeps_the_top_entries_by_squared_gradient():
    batches = [lm_batch(token_batch(seed=s)) for s in (1, 2)]
    scores = _manual_fisher(tiny_llama(), batches)
    model = dt.wrap(tiny_llama(), dt.FisherConfig(num_params=300, fisher_batches=2), calibration_data=iter(batches * 3))
    threshold = torch.cat([s.flatten() for s in scores.values()]).topk(300).values.min()
    kept = 0
    for name, layer in model.delta_layers():
        delta = layer.sparse_delta["default"]
        assert delta.indices.dtype == torch.int32 and torch.all(delta.indices[1:] > delta.indices[:-1])
        layer_scores = scores[name + ".weight"].flatten()
        assert torch.all(layer_scores[delta.indices.long()] >= threshold * (1 - 1e-4))
        kept += delta.indices.numel()
    assert kept == 300 == model.trainable_parameters().by_method["fisher"]
    # requires_grad flags are back as they were: only the kept values train
    assert all(("sparse_delta" in n) == p.requires_grad for n, p in model.named_parameters())


def test_fisher_optimizer_state_exists_only_for_kept_entries(tmp_path):
    model = dt.wrap(tiny_llama(), dt.FisherConfig(density=0.01, fisher_batches=1), calibration_data=[lm_batch()])
    budget = model.trainable_parameters().trainable
    total = sum(p.numel() for n, p in tiny_llama().named_parameters() if "proj" in n)  # every targeted weight
    assert budget == round(0.01 * total)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**lm_batch()).loss.backward()
    optimizer.step()
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * budget < 0.05 * total
    path = model.save(tmp_path / "fisher")
    assert (path / "adapter_model.safetensors").stat().st_size < 8 * budget + 8192  # int32 index + float32 value each


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_fisher_fused_linear_matches_the_swapped_weight_path(build):
    model = dt.wrap(build(), dt.FisherConfig(density=0.05, fisher_batches=1), calibration_data=[lm_batch()])
    randomize_adapters(model)
    for _, layer in list(model.delta_layers())[:3]:
        base, delta = layer.base_layer, layer.sparse_delta["default"]
        x = torch.randn(2, 3, base.weight.shape[0] if type(base).__name__ == "Conv1D" else base.weight.shape[1], requires_grad=True)
        fused = layer(x)
        grad_out = torch.randn_like(fused)
        fused_grads = torch.autograd.grad(fused, [x, delta.values], grad_out)
        values = delta.values.detach().clone().requires_grad_()
        weight = base.weight.reshape(-1).index_add(0, delta.indices, values).view(base.weight.shape)
        reference = torch.func.functional_call(base, {"weight": weight}, (x,))
        reference_grads = torch.autograd.grad(reference, [x, values], grad_out)
        assert torch.allclose(fused, reference, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused_grads, reference_grads))


def test_fisher_without_data_or_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration_data"):
        dt.wrap(tiny_llama(), dt.FisherConfig())
    with pytest.raises(ValueError, match="returned no loss.*include labels"):
        dt.wrap(tiny_llama(), dt.FisherConfig(), calibration_data=[{"input_ids": token_batch()}])
    with pytest.raises(ValueError, match="yielded no batch"):
        dt.wrap(tiny_llama(), dt.FisherConfig(), calibration_data=[])
    with pytest.raises(dt.ConfigError, match="not both"):
        dt.FisherConfig(density=0.1, num_params=10)
    with pytest.raises(dt.ConfigError, match="exceeds"):
        dt.wrap(tiny_llama(), dt.FisherConfig(num_params=10**9), calibration_data=[lm_batch()])


def test_fisher_builds_on_the_meta_device_for_memory_estimates():
    with torch.device("meta"):
        model = dt.wrap(tiny_llama(), dt.FisherConfig(num_params=500), calibration_data=[{k: v.to("meta") for k, v in lm_batch().items()}])
    assert model.trainable_parameters().trainable == 500


# == LayerNorm tuning =============================================================================
def test_layernorm_tuning_targets_every_norm_weight_and_bias():
    llama = dt.wrap(tiny_llama(), dt.LayerNormTuningConfig())
    assert {n.rsplit(".", 1)[-1] for n in wrapped_names(llama)} == {"input_layernorm", "post_attention_layernorm", "norm"}
    assert llama.trainable_parameters().trainable == 5 * 32  # RMSNorm: weights only
    bert = dt.wrap(tiny_bert_classifier(), dt.LayerNormTuningConfig())
    assert bert.trainable_parameters().trainable == 5 * 2 * 32  # embeddings + 2 per layer, weight and bias
    no_bias = dt.wrap(tiny_bert_classifier(), dt.LayerNormTuningConfig(train_bias=False))
    assert no_bias.trainable_parameters().trainable == 5 * 32
    t5 = dt.wrap(tiny_t5(), dt.LayerNormTuningConfig())
    assert {type(m.get_base_layer()).__name__ for _, m in t5.delta_layers()} == {"T5LayerNorm"}


def test_layernorm_tuning_changes_the_norm_like_training_its_weight():
    model = dt.wrap(tiny_gpt2(), dt.LayerNormTuningConfig())
    randomize_adapters(model)
    layer = model.model.transformer.h[0].ln_1
    x = torch.randn(2, 4, 32)
    base = layer.base_layer
    expected = nn.functional.layer_norm(x, (32,), base.weight + layer.norm_weight_delta["default"],
                                        base.bias + layer.norm_bias_delta["default"], base.eps)
    assert torch.allclose(layer(x), expected, atol=1e-6)


# == partial fine-tuning ==========================================================================
def test_partial_trains_the_last_blocks_and_optionally_the_head():
    model = dt.wrap(tiny_llama(layers=3), dt.PartialConfig(last_k_layers=1))
    assert wrapped_names(model) == ["model.layers.2"]
    block = tiny_llama(layers=3).model.layers[2]
    assert model.trainable_parameters().trainable == sum(p.numel() for p in block.parameters())
    with_head = dt.wrap(tiny_llama(layers=3), dt.PartialConfig(last_k_layers=2, train_head=True))
    assert wrapped_names(with_head) == ["lm_head", "model.layers.1", "model.layers.2"]
    chosen = dt.wrap(tiny_llama(layers=3), dt.PartialConfig(layers_to_transform=[0]))
    assert wrapped_names(chosen) == ["model.layers.0"]
    named = dt.wrap(tiny_llama(layers=3), dt.PartialConfig(target_modules=["model.norm"]))
    assert wrapped_names(named) == ["model.norm"]
    t5 = dt.wrap(tiny_t5(), dt.PartialConfig(last_k_layers=1))
    assert wrapped_names(t5) == ["decoder.block.1", "encoder.block.1"]


def test_partial_head_in_modules_to_save_is_trained_once_and_total_counts_the_model_once():
    base = tiny_bert_classifier()
    total = sum(p.numel() for p in base.parameters())
    model = dt.wrap(base, dt.PartialConfig(last_k_layers=1, train_head=True, modules_to_save=["classifier"]))
    assert wrapped_names(model) == ["bert.encoder.layer.1", "classifier"]
    assert model.trainable_parameters().total == total


def test_partial_refuses_blocks_that_already_hold_other_adapters():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2), adapter_name="lora")
    with pytest.raises(dt.ConfigError, match="add the partial fine-tuning adapter first"):
        dt.wrap(model, dt.PartialConfig(last_k_layers=1), adapter_name="partial")
    with pytest.raises(dt.ConfigError, match="nothing to train"):
        dt.wrap(tiny_llama(), dt.PartialConfig(last_k_layers=0))
    with pytest.raises(dt.ConfigError, match="no numbered blocks"):
        dt.wrap(tiny_mlp(), dt.PartialConfig())
