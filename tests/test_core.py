"""The core: injection, the wrapper's adapter management, merging, files and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    frozen_snapshot, randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_mlp, tiny_t5,
    tiny_vit, token_batch, train_steps,
)
from torch import nn

import deltatune as dt
from deltatune.layer import DeltaLayer




def lm_loss(model, tokens=None):
    tokens = token_batch() if tokens is None else tokens
    return model(input_ids=tokens, labels=tokens).loss


# -- gradients and the frozen base --------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_gradients_reach_only_adapters_and_base_stays_bit_identical(build):
    model = dt.wrap(build(), dt.LoraConfig(r=4))
    before = frozen_snapshot(model)
    model.train()
    loss = lm_loss(model)
    loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    train_steps(model, lm_loss, steps=3)
    after = frozen_snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_modules_to_save_head_trains_in_full_beside_the_adapter():
    base = tiny_bert_classifier()
    original_head = base.classifier.weight.detach().clone()
    model = dt.wrap(base, dt.LoraConfig(r=4, modules_to_save=["classifier"]))
    labels = torch.tensor([0, 1, 2, 1])
    train_steps(model, lambda m: m(input_ids=token_batch(), labels=labels).loss, steps=2)
    trained_copy = model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(trained_copy, original_head)
    assert torch.equal(model.model.classifier.original_module.weight, original_head)
    report = model.trainable_parameters()
    assert report.by_method["modules_to_save"] == sum(p.numel() for p in base.classifier.modules_to_save["default"].parameters())


# -- outputs at init, merging ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_t5])
def test_zero_b_init_leaves_outputs_exactly_unchanged(build, tokens):
    base = build()
    kwargs = {"input_ids": tokens, "decoder_input_ids": tokens} if "T5" in type(base).__name__ else {"input_ids": tokens}
    # Under no_grad both runs take the same kernels (T5 differs by an ulp with vs without grads).
    with torch.no_grad():
        reference = base(**kwargs).logits
        model = dt.wrap(base, dt.LoraConfig(r=4))
        assert torch.equal(model(**kwargs).logits, reference)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_and_unmerge_restores_base(build, tokens):
    base = build()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = dt.wrap(base, dt.LoraConfig(r=4, lora_alpha=8))
    randomize_adapters(model)
    unmerged = model(input_ids=tokens).logits
    model.merge()
    assert relative_error(model(input_ids=tokens).logits, unmerged) < 1e-5
    model.unmerge()
    restored = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if "lora_" not in k}
    for key, value in original.items():
        assert torch.allclose(restored[key], value, atol=1e-6), key
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert relative_error(plain(input_ids=tokens).logits, unmerged) < 1e-5


def test_several_active_adapters_are_summed_and_can_be_disabled(tokens):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model, seed=1)  # only "a" is trainable/active so far
    base_out = None
    with model.disable_adapters():
        base_out = model(input_ids=tokens).logits
    model.set_adapter("b")
    randomize_adapters(model, seed=2)
    out_a = (model.set_adapter("a"), model(input_ids=tokens).logits)[1]
    out_b = (model.set_adapter("b"), model(input_ids=tokens).logits)[1]
    model.set_adapter(["a", "b"])
    both = model(input_ids=tokens).logits
    assert not torch.allclose(out_a, out_b)
    # q_proj is linear in its delta but attention is not: compare layer outputs instead of logits.
    layer = model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    layer.set_active(["a"]); ya = layer(x)
    layer.set_active(["b"]); yb = layer(x)
    layer.set_active(["a", "b"]); yab = layer(x)
    y0 = layer.base_layer(x)
    assert torch.allclose(yab, ya + yb - y0, atol=1e-6)
    assert not torch.allclose(both, base_out)
    with model.disable_adapters():
        assert torch.equal(model(input_ids=tokens).logits, base_out)


def test_delete_adapter_restores_plain_modules(tokens):
    base = tiny_llama()
    reference = base(input_ids=tokens).logits
    model = dt.wrap(base, dt.LoraConfig(r=4))
    randomize_adapters(model)
    model.delete_adapter("default")
    assert not any(isinstance(m, DeltaLayer) for m in model.model.modules())
    assert torch.equal(model(input_ids=tokens).logits, reference)


# -- targets ------------------------------------------------------------------------------------
def _targets(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)})


@pytest.mark.parametrize(
    "build, expected",
    [
        (tiny_llama, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
        (tiny_bert_classifier, ["dense", "key", "query", "value"]),
        (tiny_t5, ["k", "o", "q", "v", "wi", "wo"]),
        (tiny_vit, None),  # module names differ across transformers versions: every linear but the head
    ],
)
def test_default_targets_per_architecture_never_the_head(build, expected):
    base = build()
    linears = sorted(n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "classifier")
    model = dt.wrap(base, dt.LoraConfig(r=2))
    if expected is None:
        assert sorted(n for n, _ in model.delta_layers()) == linears
    else:
        assert _targets(model) == expected
    names = [n for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)]
    assert not any(n.startswith(("lm_head", "classifier", "pooler")) for n in names)


def test_fallback_is_every_linear_but_the_output_head():
    model = dt.wrap(tiny_mlp(), dt.LoraConfig(r=2))
    wrapped = [n for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)]
    assert wrapped == ["0", "2", "4"]  # nn.Sequential has no named head: all linears
    llama = tiny_llama()
    llama.config.model_type = "unknown-arch"
    model = dt.wrap(llama, dt.LoraConfig(r=2))
    assert "lm_head" not in [n for n, m in model.model.named_modules() if isinstance(m, DeltaLayer)]


def test_target_matching_by_suffix_regex_type_exclude_and_layers():
    by_suffix = dt.wrap(tiny_llama(layers=3), dt.LoraConfig(r=2, target_modules=["self_attn.q_proj"]))
    assert len(list(by_suffix.delta_layers())) == 3
    by_regex = dt.wrap(tiny_llama(layers=3), dt.LoraConfig(r=2, target_modules=r".*\.(q|v)_proj"))
    assert _targets(by_regex) == ["q_proj", "v_proj"]
    by_type = dt.wrap(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=[], target_types=["Conv1D"]))
    assert _targets(by_type) == ["c_attn", "c_fc", "c_proj"]
    excluded = dt.wrap(tiny_llama(layers=3), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    assert _targets(excluded) == ["q_proj"]
    some_layers = dt.wrap(tiny_llama(layers=3), dt.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert sorted(n for n, _ in some_layers.delta_layers()) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


# -- non-transformers models ----------------------------------------------------------------------
def test_plain_mlp_wraps_trains_and_merges():
    model = dt.wrap(tiny_mlp(), dt.LoraConfig(r=4, lora_alpha=8))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    losses = train_steps(model, lambda m: nn.functional.cross_entropy(m(x), y), steps=60, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0]
    out = model(x)
    merged = model.merge_and_unload()
    assert type(merged) is nn.Sequential
    assert relative_error(merged(x), out) < 1e-5


def test_vision_transformer_wraps_trains_and_merges():
    model = dt.wrap(tiny_vit(), dt.LoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    pixels, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    losses = train_steps(model, lambda m: m(pixel_values=pixels, labels=labels).loss, steps=40, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    out = model(pixel_values=pixels).logits
    plain = model.merge_and_unload()
    assert relative_error(plain(pixel_values=pixels).logits, out) < 1e-5


def test_lora_learns_a_toy_task_on_a_small_transformer():
    base = tiny_llama(hidden=64)
    # A random head at init scale 0.02 caps the logits near zero; pretrained heads are larger.
    with torch.no_grad():
        base.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    model = dt.wrap(base, dt.LoraConfig(r=8, lora_alpha=16))
    # A fixed next-token rule (t -> t+7) the frozen random model cannot do at start.
    tokens = (torch.arange(0, 96).reshape(4, 24) * 7) % 101
    losses = train_steps(model, lambda m: lm_loss(m, tokens), steps=60, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]


# -- files ----------------------------------------------------------------------------------------
def test_save_load_round_trips_bit_exact_and_stores_only_the_adapter(tmp_path, tokens):
    base = tiny_llama(layers=4, hidden=256, vocab=4000)
    model = dt.wrap(base, dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    randomize_adapters(model)
    model.eval()
    out = model(input_ids=tokens).logits
    path = model.save(tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = dt.load(tiny_llama(layers=4, hidden=256, vocab=4000), path)
    saved = model.adapter_state_dict()
    restored = loaded.adapter_state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(loaded(input_ids=tokens).logits, out)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert (path / "adapter_model.safetensors").stat().st_size < 0.01 * base_bytes
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = dt.load(tiny_llama(layers=4, hidden=256, vocab=4000), path, is_trainable=True)
    assert trainable.trainable_parameters().trainable == sum(t.numel() for t in saved.values())


def test_save_is_atomic_old_adapter_survives_a_failed_save(tmp_path, monkeypatch):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    path = model.save(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    randomize_adapters(model)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.io.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_config_field_names_it_and_lists_valid_ones():
    with pytest.raises(dt.ConfigError, match=r"Unknown field 'rank'.*Valid fields:.*lora_alpha"):
        dt.make_config("lora", rank=8)
    with pytest.raises(ValueError, match="Unknown method 'lorra'.*'lora'"):
        dt.make_config("lorra")


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_positive(rank):
    with pytest.raises(dt.ConfigError, match="rank r must be a positive integer"):
        dt.LoraConfig(r=rank)


def test_target_matching_nothing_lists_closest_names():
    with pytest.raises(dt.ConfigError, match=r"matches no module.*Closest module names: .*q_proj"):
        dt.wrap(tiny_llama(), dt.LoraConfig(target_modules=["q_prj"]))


def test_adapter_name_clash_is_an_error():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", dt.LoraConfig(r=2))


def test_loading_an_adapter_of_another_shape_names_the_tensor(tmp_path):
    dt.wrap(tiny_llama(hidden=32), dt.LoraConfig(r=4)).save(tmp_path / "a")
    with pytest.raises(dt.AdapterFileError, match=r"lora_A.weight has shape \(4, 32\).*needs \(4, 64\)"):
        dt.load(tiny_llama(hidden=64), tmp_path / "a")


def test_truncated_or_foreign_files_are_clear_errors(tmp_path):
    path = dt.wrap(tiny_llama(), dt.LoraConfig(r=4)).save(tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(dt.AdapterFileError, match="truncated or corrupt"):
        dt.load(tiny_llama(), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(dt.ConfigError, match="not valid JSON"):
        dt.load(tiny_llama(), path)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(dt.ConfigError, match="'VERA', which deltatune does not provide"):
        dt.load(tiny_llama(), path)


def test_config_for_another_method_is_refused():
    with pytest.raises(dt.ConfigError, match="for method 'IA3', not 'LORA'"):
        dt.LoraConfig.from_dict({"peft_type": "IA3", "r": 4})


def test_pickled_adapter_files_are_never_loaded(tmp_path):
    dt.LoraConfig(r=2).to_json_file(tmp_path / "adapter_config.json")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(dt.AdapterFileError, match="pickle"):
        dt.load(tiny_llama(), tmp_path)


# -- the wrapper stays a normal model -------------------------------------------------------------
def test_generate_and_torch_compile_work_through_the_wrapper(tokens):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    randomize_adapters(model)
    out = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_gradient_checkpointing_works_on_a_frozen_base(tokens):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
        randomize_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        lm_loss(model, tokens).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert checkpointed[name] is not None and checkpointed[name].abs().sum() > 0, name
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


# -- training hooks a method can declare ----------------------------------------------------------
def test_methods_reach_the_training_loop_through_generic_hooks(monkeypatch):
    from dataclasses import dataclass

    from deltatune import registry
    from deltatune.registry import MethodInfo

    calls = []

    @dataclass
    class ProbeConfig(dt.LoraConfig):
        method = "probe-hooks"
        peft_type = "PROBE_HOOKS"

    lora = dt.method_info("lora")
    monkeypatch.setitem(registry._METHODS, "probe-hooks", MethodInfo(
        name="probe-hooks", config_class=ProbeConfig, attach=lora.attach, kind="reparameterized", description="test",
        after_step=lambda model, name, config, step: calls.append((name, step)),
        auxiliary_loss=lambda model, name, config: torch.tensor(2.5),
    ))
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2), adapter_name="plain")
    assert model.auxiliary_loss() is None
    dt.wrap(model, ProbeConfig(r=2), adapter_name="probe")
    assert model.auxiliary_loss().item() == 2.5
    model.after_optimizer_step(7)
    assert calls == [("probe", 7)]
    model.set_adapter("plain")
    model.after_optimizer_step(8)
    assert calls == [("probe", 7)]


@pytest.mark.parametrize("fields, message", [
    ({"use_rslora": "false"}, r"LoraConfig.use_rslora must be bool, got 'false' \(str\)"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"r": 4.0}, "r must be a positive integer, got 4.0"),
    ({"target_modules": [1, 2]}, "target_modules must be list"),
])
def test_config_values_of_the_wrong_type_or_not_finite_are_refused_by_name(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(**fields)
    with pytest.raises(dt.ConfigError, match=message):  # the same from a file
        dt.LoraConfig.from_dict({"peft_type": "LORA", **fields}, foreign_ok=True)


def test_merging_an_unknown_adapter_names_the_known_ones():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"No adapter named \['nope'\] to merge; this model has \['default'\]"):
        model.merge(["nope"])


def test_bad_yaml_is_a_usage_error_naming_the_file(tmp_path, capsys):
    from deltatune.cli import EXIT_USAGE, main

    job = tmp_path / "job.yaml"
    job.write_text("task: [unclosed\n")
    assert main(["train", "--config", str(job)]) == EXIT_USAGE
    assert f"{job} is not valid YAML" in capsys.readouterr().err
