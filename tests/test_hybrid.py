"""Hybrids: several methods active on one model, on the same layers, each saved under its own name."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods.bitfit import BitFitLayer
from deltatune.methods.ia3 import IA3Layer
from deltatune.methods.lora import LoraLinear


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and many times faster when other jobs share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def lm_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": token_batch(), "labels": token_batch()}


SECOND_METHODS = {  # name: (method, config); LoRA targets every linear layer first
    "bitfit": ("bitfit", lambda: dt.BitFitConfig(add_missing_biases=True)),
    "ia3": ("ia3", lambda: dt.IA3Config()),
    "fisher": ("fisher", lambda: dt.FisherConfig(density=0.05, fisher_batches=1)),
    "layernorm": ("layernorm", lambda: dt.LayerNormTuningConfig()),
    "adapter": ("adapter", lambda: dt.BottleneckConfig(placement="parallel")),
}


def lora_plus(second: str, lora_targets: list[str] | None = None, second_config=None) -> tuple[dt.DeltaModel, torch.Tensor]:
    base = tiny_llama()
    with torch.no_grad():
        reference = base(input_ids=token_batch()).logits
    model = dt.wrap(base, dt.LoraConfig(r=4, target_modules=lora_targets), adapter_name="lora")
    method, make_config = SECOND_METHODS[second]
    build_kwargs = {"calibration_data": [lm_batch()]} if method == "fisher" else {}
    dt.wrap(model, second_config or make_config(), adapter_name=second, **build_kwargs)
    return model, reference


def params_of(model: dt.DeltaModel, adapter_name: str) -> set[int]:
    return {id(p) for _, layer in model.delta_layers() for p in layer.adapter_parameters(adapter_name)}


@pytest.mark.parametrize("second", list(SECOND_METHODS))
def test_lora_plus_another_method_starts_unchanged_trains_both_and_merges(second):
    model, reference = lora_plus(second)
    method = SECOND_METHODS[second][0]
    assert model.active_adapters == ["lora", second]
    with torch.no_grad():  # LoRA's B = 0 and the other method's neutral init: the base model's output
        assert torch.equal(model(input_ids=token_batch()).logits, reference)
    report = model.trainable_parameters()
    assert set(report.by_method) == {"lora", method}
    assert report.by_method["lora"] == sum(p.numel() for _, layer in model.delta_layers() for p in layer.adapter_parameters("lora"))
    assert sum(report.by_method.values()) == report.trainable

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    randomize_adapters(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(**lm_batch()).loss.backward()
        optimizer.step()
    model.eval()
    methods = params_of(model, "lora") | params_of(model, second)
    assert all((id(p) in methods) == (p.grad is not None) for p in model.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    tokens = token_batch(seed=5)
    out = model(input_ids=tokens).logits
    if dt.method_info(method).mergeable:
        model.merge()
        assert relative_error(model(input_ids=tokens).logits, out) < 1e-5
        model.unmerge()
    else:
        with pytest.raises(TypeError, match="cannot be merged"):
            model.merge()
        model.merge(["lora"])
        assert relative_error(model(input_ids=tokens).logits, out) < 1e-5
        model.unmerge()
    assert relative_error(model(input_ids=tokens).logits, out) < 1e-5


def _save_and_load_each(model: dt.DeltaModel, second: str, tmp_path) -> None:
    tokens = token_batch(seed=5)
    out = model(input_ids=tokens).logits
    model.save(tmp_path / "lora", adapter_name="lora")
    model.save(tmp_path / second, adapter_name=second)
    loaded = dt.load(tiny_llama(), tmp_path / "lora", adapter_name="lora")
    loaded.load_adapter(tmp_path / second, adapter_name=second)
    loaded.set_adapter(["lora", second])
    assert torch.equal(loaded(input_ids=tokens).logits, out)
    for name in ("lora", second):
        saved, restored = model.adapter_state_dict(name), loaded.adapter_state_dict(name)
        assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)


@pytest.mark.parametrize("second", SECOND_METHODS)
def test_lora_plus_another_method_on_the_same_modules_saves_and_loads_each_under_its_own_name(second, tmp_path):
    model, _ = lora_plus(second)
    randomize_adapters(model)
    _save_and_load_each(model, second, tmp_path)


def test_lora_plus_bitfit_on_other_modules_saves_and_loads_each_under_its_own_name(tmp_path):
    bitfit = dt.BitFitConfig(target_modules=["o_proj", "down_proj"], add_missing_biases=True)
    model, _ = lora_plus("bitfit", lora_targets=["q_proj", "v_proj"], second_config=bitfit)
    randomize_adapters(model)
    _save_and_load_each(model, "bitfit", tmp_path)


@pytest.mark.parametrize("first", ["lora", "ia3"])
def test_lora_and_ia3_on_the_same_linear_in_either_order_merge_exactly(first):
    base = tiny_llama()
    tokens = token_batch()
    with torch.no_grad():
        reference = base(input_ids=tokens).logits
    configs = {"lora": dt.LoraConfig(r=4), "ia3": dt.IA3Config()}
    second = "ia3" if first == "lora" else "lora"
    model = dt.wrap(base, configs[first], adapter_name=first)
    dt.wrap(model, configs[second], adapter_name=second)
    k_proj = model.model.model.layers[0].self_attn.k_proj
    outer, inner = (IA3Layer, LoraLinear) if first == "lora" else (LoraLinear, IA3Layer)
    assert type(k_proj) is outer and type(k_proj.base_layer) is inner
    randomize_adapters(model)
    out = model(input_ids=tokens).logits
    x = torch.randn(3, 32)
    ia3_layer, lora_layer = (k_proj, k_proj.base_layer) if first == "lora" else (k_proj.base_layer, k_proj)
    scale = ia3_layer.ia3_l["ia3"].flatten()
    lora_out = lora_layer.lora_B["lora"](lora_layer.lora_A["lora"](x)) * lora_layer.scaling["lora"]
    plain = k_proj.get_base_layer()
    # The outer method sees the inner one's output: IA3 outside scales LoRA's update too.
    expected = (plain(x) + lora_out) * scale if first == "lora" else plain(x) * scale + lora_out
    assert torch.allclose(k_proj(x), expected, atol=1e-6)
    model.merge()
    assert relative_error(model(input_ids=tokens).logits, out) < 1e-5
    model.unmerge()
    assert relative_error(model(input_ids=tokens).logits, out) < 1e-5
    with torch.no_grad(), model.disable_adapters():  # the base weights are back
        assert relative_error(model(input_ids=tokens).logits, reference) < 1e-5


def test_lora_plus_bitfit_share_a_linear_and_merge_into_weight_and_bias():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="lora")
    dt.wrap(model, dt.BitFitConfig(target_modules=["q_proj"], add_missing_biases=True), adapter_name="bitfit")
    q_proj = model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is BitFitLayer and type(q_proj.base_layer) is LoraLinear
    randomize_adapters(model)
    x = torch.randn(3, 32)
    expected = q_proj.base_layer(x) + q_proj.bias_delta["bitfit"]
    assert torch.allclose(q_proj(x), expected, atol=1e-6)
    plain = model.merge_and_unload()
    merged = plain.model.layers[0].self_attn.q_proj
    assert type(merged) is torch.nn.Linear and merged.bias is not None
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_partial_first_then_lora_on_the_other_blocks():
    model = dt.wrap(tiny_llama(layers=3), dt.PartialConfig(last_k_layers=1), adapter_name="partial")
    dt.wrap(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="lora")
    lora_layers = sorted(n for n, m in model.model.named_modules() if isinstance(m, LoraLinear))
    assert lora_layers == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    report = model.trainable_parameters()
    block = tiny_llama(layers=3).model.layers[2]
    assert report.trainable == sum(p.numel() for p in block.parameters()) + report.by_method["lora"]
    model.train()
    model(**lm_batch()).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fisher_outside_lora_follows_its_values_without_gradients_too():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="lora")
    dt.wrap(model, dt.FisherConfig(target_modules=["q_proj"], num_params=50), adapter_name="fisher", calibration_data=[lm_batch()])
    randomize_adapters(model)
    q_proj = model.model.model.layers[0].self_attn.q_proj
    delta, lora = q_proj.sparse_delta["fisher"], q_proj.base_layer
    x = torch.randn(2, 32)
    with torch.no_grad():
        q_proj(x)
        delta.values.mul_(5)  # as an optimizer step would change them
        weight = q_proj.weight.reshape(-1).index_add(0, delta.indices, delta.values).view(q_proj.weight.shape)
        expected = x @ weight.T + lora.lora_B["lora"](lora.lora_A["lora"](x)) * lora.scaling["lora"]
        assert torch.allclose(q_proj(x), expected, atol=1e-6)
