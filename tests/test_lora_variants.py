"""LoRA's variants: scaling rules, DoRA, init choices, per-module patterns, non-Linear targets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import deltatune as dt


def _q_proj(model):
    return model.model.model.layers[0].self_attn.q_proj


def test_scaling_is_alpha_over_r_or_over_sqrt_r_for_rslora():
    plain = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    rs = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj"]))
    assert _q_proj(plain).scaling["default"] == 4.0
    assert _q_proj(rs).scaling["default"] == 16 / math.sqrt(4)


def test_rank_and_alpha_patterns_apply_per_module():
    config = dt.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    model = dt.wrap(tiny_llama(), config)
    layers = dict(model.delta_layers())
    assert layers["model.layers.0.self_attn.v_proj"].rank["default"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].rank["default"] == 8
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == 32 / 8
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 1.0


def test_dora_starts_equal_to_base_and_merges_exactly():
    tokens = token_batch()
    base = tiny_llama()
    with torch.no_grad():
        reference = base(input_ids=tokens).logits
        model = dt.wrap(base, dt.LoraConfig(r=4, use_dora=True))
        assert relative_error(model(input_ids=tokens).logits, reference) < 1e-6
    layer = _q_proj(model)
    assert torch.allclose(layer.lora_magnitude_vector["default"], layer.weight.norm(dim=1))
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
        model.merge()
        assert relative_error(model(input_ids=tokens).logits, unmerged) < 1e-5
        model.unmerge()
        assert relative_error(model(input_ids=tokens).logits, unmerged) < 1e-5
    assert any("lora_magnitude_vector" in k for k in model.adapter_state_dict())


def test_dora_on_gpt2_conv1d_merges_exactly():
    tokens = token_batch()
    model = dt.wrap(tiny_gpt2(), dt.LoraConfig(r=4, use_dora=True))
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(input_ids=tokens).logits
        merged = model.merge_and_unload()
        assert relative_error(merged(input_ids=tokens).logits, unmerged) < 1e-5


def test_pissa_moves_top_singular_directions_into_the_adapter():
    base = tiny_llama()
    weight = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tokens = token_batch()
    with torch.no_grad():
        reference = base(input_ids=tokens).logits
        model = dt.wrap(base, dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj"]))
        assert relative_error(model(input_ids=tokens).logits, reference) < 1e-5
    layer = _q_proj(model)
    delta = layer.delta_weight("default")
    top = torch.linalg.svdvals(weight)[:4]
    assert torch.allclose(torch.linalg.svdvals(delta)[:4], top, rtol=1e-4)
    assert torch.allclose(layer.base_layer.weight + delta, weight, atol=1e-5)


def test_pissa_adapter_reloads_onto_a_fresh_base(tmp_path):
    tokens = token_batch()
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.01)
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    model.save(tmp_path / "pissa")
    loaded = dt.load(tiny_llama(), tmp_path / "pissa")
    with torch.no_grad():
        assert relative_error(loaded(input_ids=tokens).logits, out) < 1e-5


def test_gaussian_init_keeps_b_zero_and_a_random():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["q_proj"]))
    layer = _q_proj(model)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 4) < 0.05


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, kernel_size=1)
        self.head = nn.Linear(8, 4)

    def forward(self, pixels, ids):
        features = self.conv1x1(torch.relu(self.conv(pixels))).mean(dim=(2, 3))
        return self.head(features) + self.embed(ids).mean(dim=1)[:, :4]


def test_embedding_and_conv2d_targets_merge_exactly():
    torch.manual_seed(0)
    base = TinyConvNet().eval()
    pixels, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 50, (2, 5))
    reference = base(pixels, ids)
    model = dt.wrap(base, dt.LoraConfig(r=2, target_modules=["embed", "conv", "conv1x1"]))
    assert torch.equal(model(pixels, ids), reference)
    randomize_adapters(model)
    out = model(pixels, ids)
    assert relative_error(out, reference) > 1e-3
    plain = model.merge_and_unload()
    assert relative_error(plain(pixels, ids), out) < 1e-5


def test_dora_on_an_embedding_is_a_clear_error():
    with pytest.raises(dt.ConfigError, match="DoRA is supported on Linear"):
        dt.wrap(TinyConvNet(), dt.LoraConfig(r=2, use_dora=True, target_modules=["embed"]))


def test_unsupported_module_type_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(dt.ConfigError, match="'1' is a LayerNorm"):
        dt.wrap(model, dt.LoraConfig(r=2, target_modules=["0", "1"]))
    assert isinstance(model[0], nn.Linear)  # nothing was wrapped before the error


def test_pissa_load_then_delete_or_unwrap_restores_the_shared_base_bit_exactly(tmp_path):
    """A server evicts adapters with delete_adapter: a PiSSA adapter must not leave the base rewritten."""
    trained = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]))
    path = trained.save(tmp_path / "pissa")
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.load(base, path)
    rewritten = base.model.layers[0].self_attn.q_proj.get_base_layer().weight
    assert not torch.equal(rewritten, original["model.layers.0.self_attn.q_proj.weight"])  # PiSSA's residual
    model.delete_adapter("default")
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    model.load_adapter(path, "again")
    model.unwrap()
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


def test_pissa_adapters_on_one_weight_are_deleted_newest_first_and_a_refusal_changes_nothing(tmp_path):
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.wrap(base, dt.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", dt.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]))
    rewritten = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(RuntimeError, match="delete 'second' before 'first'"):
        model.delete_adapter("first")
    assert model.adapter_names == ["first", "second"]
    assert all(torch.equal(v, rewritten[k]) for k, v in base.state_dict().items())
    model.delete_adapter("second")
    model.delete_adapter("first")
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
