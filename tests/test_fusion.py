"""AdapterFusion: attention over trained bottleneck adapters (methods/adapters/fusion.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    randomize_adapters,
    relative_error,
    tiny_bert_classifier,
    tiny_llama,
    token_batch,
)

import deltatune as dt
from deltatune.methods.adapters import BottleneckConfig
from deltatune.methods.adapters.fusion import FusionConfig, FusionLayer, load_fusion, save_fusion
from deltatune.train import TrainConfig, train

HEAD = ["classifier"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, and many times faster when other jobs share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def adapter_config(placement: str = "houlsby", head: list[str] | None = HEAD, **fields) -> BottleneckConfig:
    return BottleneckConfig(placement=placement, reduction_factor=4, modules_to_save=head, **fields)


def two_adapters(placement: str = "houlsby", build=tiny_bert_classifier, head: list[str] | None = HEAD) -> dt.DeltaModel:
    """A tiny model with bottleneck adapters "a" and "b" holding different non-trivial weights."""
    model = dt.wrap(build(), adapter_config(placement, head), adapter_name="a")
    randomize_adapters(model, seed=3)
    model.add_adapter("b", adapter_config(placement, head), activate=True)
    randomize_adapters(model, seed=4)
    return model


def with_fusion(model: dt.DeltaModel, head: list[str] | None = HEAD, **fields) -> dt.DeltaModel:
    model.add_adapter("f", FusionConfig(adapters=["a", "b"], modules_to_save=head, **fields), activate=True)
    return model


def fusion_layers(model: dt.DeltaModel) -> list[FusionLayer]:
    return [layer for _, layer in model.delta_layers() if isinstance(layer, FusionLayer)]


def logits(model: dt.DeltaModel, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


# -- what trains ---------------------------------------------------------------------------------
def test_only_fusion_parameters_get_gradients_and_the_fused_adapters_still_run():
    model = with_fusion(two_adapters())
    tokens = token_batch(batch=4)
    model.train()
    model(input_ids=tokens, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert trainable and all(".fusion.f." in n or "modules_to_save.f." in n for n in trainable), sorted(trainable)
    assert {n.rsplit(".", 2)[-2] for n in trainable if ".fusion." in n} == {"query", "key", "value"}
    assert set(model.trainable_parameters().by_method) == {"fusion", "modules_to_save"}
    # The adapters are inactive and frozen, yet they shape the output: removing one changes it.
    fused = logits(model, tokens)
    for layer in fusion_layers(model):
        layer.adapter_layer.bottleneck["b"].up.weight.data.zero_()
        layer.adapter_layer.bottleneck["b"].up.bias.data.zero_()
    assert not torch.allclose(logits(model, tokens), fused)


def test_other_adapters_and_the_base_run_unchanged_beside_a_fusion():
    model = two_adapters()
    tokens = token_batch()
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = logits(model, tokens)
    with model.disable_adapters():
        expected["base"] = logits(model, tokens)
    with_fusion(model)
    for name in ("a", "b"):
        model.set_adapter(name)
        assert torch.equal(logits(model, tokens), expected[name])
    with model.disable_adapters():
        assert torch.equal(logits(model, tokens), expected["base"])


def test_a_fused_adapter_active_beside_its_fusion_trains_but_runs_once_inside_it():
    model = with_fusion(two_adapters(head=None), head=None)
    tokens = token_batch()
    fused = logits(model, tokens)
    model.set_adapter(["f", "a"])
    assert torch.equal(logits(model, tokens), fused)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".bottleneck.a." in n for n in trainable) and any(".fusion.f." in n for n in trainable)
    assert not any(".bottleneck.b." in n for n in trainable)


def test_an_unfused_adapter_active_beside_a_fusion_runs_after_the_fused_output():
    model = two_adapters(head=None)
    model.add_adapter("c", adapter_config(head=None), activate=True)
    randomize_adapters(model, seed=6)
    with_fusion(model, head=None)
    model.set_adapter(["f", "c"])
    layer = fusion_layers(model)[0]
    adapters = layer.adapter_layer.bottleneck
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        hidden = layer.adapter_layer.base_layer(x)
        fused = hidden + layer.fusion["f"](hidden, torch.stack([adapters["a"](hidden), adapters["b"](hidden)], dim=-2))
        assert torch.allclose(layer(x), fused + adapters["c"](fused), atol=1e-6)


# -- the formulation at init ---------------------------------------------------------------------
def test_at_init_a_sequential_site_adds_the_average_of_the_adapters_contributions():
    model = with_fusion(two_adapters("houlsby"))
    layer = fusion_layers(model)[0]
    adapters = layer.adapter_layer.bottleneck
    x = torch.randn(3, 5, layer.adapter_layer.get_base_layer().in_features)
    with torch.no_grad():
        hidden = layer.adapter_layer.base_layer(x)
        contributions = [adapters["a"](hidden), adapters["b"](hidden)]
        average = (contributions[0] + contributions[1]) / 2
        assert not torch.allclose(average, contributions[0], atol=1e-2)  # the adapters differ
        # Small random query/key weights: scores near zero, so each adapter weighs about 1/2.
        weights = layer.fusion["f"].attention_weights(hidden, torch.stack(contributions, dim=-2))
        assert torch.allclose(weights, torch.full_like(weights, 0.5), atol=1e-3)
        assert relative_error(layer(x) - hidden, average) < 1e-2
        layer.fusion["f"].query.weight.zero_()  # scores exactly zero: the exact average
        assert torch.allclose(layer(x), hidden + average, atol=1e-6)


def last_hidden(model: dt.DeltaModel, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("build", [tiny_bert_classifier, tiny_llama], ids=["bert", "llama"])
def test_at_init_a_parallel_fusion_equals_both_adapters_at_half_scale(build):
    # BERT's parallel site adds inside its output module (before the LayerNorm), Llama's beside the MLP.
    tokens = token_batch()
    fused = with_fusion(two_adapters("parallel", build, head=None), head=None)
    for layer in fusion_layers(fused):
        layer.fusion["f"].query.weight.data.zero_()  # uniform weights, exactly
    # A parallel layer sums its active adapters; at half scale each, that is their average.
    summed = two_adapters("parallel", build, head=None)  # the same adapter weights (same seeds)
    summed.set_adapter(["a", "b"])
    for _, layer in summed.delta_layers():
        for adapter in layer.bottleneck.values():
            adapter.scaling *= 0.5
    with summed.disable_adapters():
        base = last_hidden(summed, tokens)
    averaged = last_hidden(fused, tokens)
    assert not torch.allclose(averaged, base, atol=1e-3)  # the adapters do change the output
    assert torch.allclose(averaged, last_hidden(summed, tokens), atol=1e-5)


def test_value_regularization_is_zero_at_init_and_pulls_the_value_towards_identity():
    model = with_fusion(two_adapters(), value_regularization=0.5)
    assert model.auxiliary_loss().item() == 0.0
    value = fusion_layers(model)[0].fusion["f"].value
    with torch.no_grad():
        value.weight.add_(0.1)
    penalty = model.auxiliary_loss()
    assert penalty.item() == pytest.approx(0.5 * 0.01 * value.weight.numel(), rel=1e-4)
    penalty.backward()
    assert (value.weight.grad > 0).all()


def test_temperature_flattens_the_weights():
    model = with_fusion(two_adapters(), temperature=4.0)
    attention = fusion_layers(model)[0].fusion["f"]
    hidden, outputs = torch.randn(2, 32), torch.randn(2, 2, 32)
    with torch.no_grad():
        attention.query.weight.copy_(torch.eye(32))
        attention.key.weight.copy_(torch.eye(32))
        soft = attention.attention_weights(hidden, outputs)
        attention.temperature = 1.0
        sharp = attention.attention_weights(hidden, outputs)
    assert torch.allclose(soft, torch.softmax(torch.log(sharp) / 4.0, dim=-1), atol=1e-5)


# -- where fusions go ----------------------------------------------------------------------------
def test_a_fusion_wraps_every_site_holding_all_adapters_or_the_targeted_ones():
    model = with_fusion(two_adapters("houlsby"))
    assert len(fusion_layers(model)) == 4  # attention output + FFN output, 2 blocks
    model.add_adapter("g", FusionConfig(adapters=["b", "a"], layers_to_transform=[1]))
    assert sorted(l.adapter_names for l in fusion_layers(model)) == [["f"], ["f"], ["f", "g"], ["f", "g"]]
    model.delete_adapter("f")
    model.delete_adapter("g")
    assert not fusion_layers(model)
    assert all(type(l).__name__ in ("SequentialAdapterLayer", "ModulesToSave") for _, l in model.delta_layers())


def test_two_active_fusions_at_one_site_is_an_error():
    model = with_fusion(two_adapters())
    model.add_adapter("g", FusionConfig(adapters=["a", "b"]))
    model.set_adapter(["f", "g"])
    with pytest.raises(RuntimeError, match="one fusion at a time"):
        model(input_ids=token_batch())


def test_a_mixed_batch_cannot_route_rows_to_a_fusion_but_can_to_the_fused_adapters():
    model = two_adapters()
    model.eval()
    tokens, rows = token_batch(batch=4), ["a", "b", None, "a"]
    with torch.no_grad():
        expected = model(input_ids=tokens, adapter_names=rows).logits
        with_fusion(model).eval()
        fused = model(input_ids=tokens).logits
        # The fusion steps aside for a batch that names the adapters per row, then comes back.
        assert torch.equal(model(input_ids=tokens, adapter_names=rows).logits, expected)
        assert torch.equal(model(input_ids=tokens).logits, fused)
    with pytest.raises(ValueError, match="fusion"):
        model(input_ids=tokens, adapter_names=["f", "a", "f", "b"])


# -- errors --------------------------------------------------------------------------------------
def test_missing_adapters_are_named_and_leave_the_model_untouched():
    model = two_adapters()
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(dt.ConfigError, match=r"\['zzz'\].*its bottleneck adapters: \['a', 'b'\]"):
        model.add_adapter("f", FusionConfig(adapters=["a", "zzz"]))
    assert [type(m).__name__ for m in model.modules()] == before and "f" not in model.configs
    with pytest.raises(dt.ConfigError, match="two or more"):
        model.add_adapter("f", FusionConfig())


def test_adapters_on_different_modules_cannot_be_fused():
    model = dt.wrap(tiny_bert_classifier(), adapter_config("houlsby", layers_to_transform=[0]), adapter_name="a")
    model.add_adapter("b", adapter_config("houlsby", layers_to_transform=[1]))
    with pytest.raises(dt.ConfigError, match="same placement and target_modules"):
        model.add_adapter("f", FusionConfig(adapters=["a", "b"]))
    model.add_adapter("c", adapter_config("houlsby"))
    with pytest.raises(dt.ConfigError, match=r"leave none of the modules that hold all of \['a', 'c'\]"):
        model.add_adapter("f", FusionConfig(adapters=["a", "c"], layers_to_transform=[1]))
    with pytest.raises(dt.ConfigError, match="select.* module.*that do not hold all of"):
        model.add_adapter("f", FusionConfig(adapters=["a", "c"], target_modules=["output.dense"]))
    model.add_adapter("f", FusionConfig(adapters=["a", "c"], target_modules=["output.dense"], layers_to_transform=[0]))
    assert len(fusion_layers(model)) == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"adapters": ["a"]}, "names one adapter"),
        ({"adapters": ["a", "a"]}, "more than once"),
        ({"adapters": ["a", "b"], "temperature": 0}, "temperature"),
        ({"adapters": ["a", "b"], "init_std": 0}, "init_std"),
        ({"adapters": ["a", "b"], "value_regularization": -1}, "value_regularization"),
        ({"adapters": "a,b"}, "list of adapter names"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        FusionConfig(**fields)


def test_deleting_a_fused_adapter_makes_the_fusion_say_so():
    model = with_fusion(two_adapters())
    model.delete_adapter("b")
    model.set_adapter("f")
    with pytest.raises(RuntimeError, match=r"fuses adapters \['b'\], which were deleted"):
        model(input_ids=token_batch())


# -- files ---------------------------------------------------------------------------------------
def trained_fusion() -> dt.DeltaModel:
    model = with_fusion(two_adapters())
    randomize_adapters(model, seed=5, scale=0.5)  # the fusion (and its head) only: it is the active one
    return model


def test_saving_the_fusion_alone_needs_its_adapters_to_load(tmp_path):
    model = trained_fusion()
    tokens = token_batch()
    expected = logits(model, tokens)
    model.save(tmp_path / "a", "a")
    model.save(tmp_path / "b", "b")
    path = model.save(tmp_path / "f", "f")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTER_FUSION" and saved["adapters"] == ["a", "b"]
    assert all(".fusion." in k or "classifier" in k for k in model.adapter_state_dict("f"))

    only_a = dt.load(tiny_bert_classifier(), tmp_path / "a", adapter_name="a")
    with pytest.raises(dt.ConfigError, match=r"needs bottleneck adapters \['b'\]"):
        only_a.load_adapter(path, "f")
    only_a.load_adapter(tmp_path / "b", "b", activate=False)
    only_a.load_adapter(path, "f")
    assert torch.equal(logits(only_a, tokens), expected)


def test_save_fusion_and_load_fusion_round_trip_bit_exact(tmp_path):
    model = trained_fusion()
    tokens = token_batch()
    expected = logits(model, tokens)
    save_fusion(model, tmp_path / "saved", "f")
    files = sorted(str(p.relative_to(tmp_path / "saved")) for p in (tmp_path / "saved").rglob("*") if p.is_file())
    assert files == [
        f"{folder}/{name}" for folder in ("adapters/a", "adapters/b", "fusion")
        for name in ("README.md", "adapter_config.json", "adapter_model.safetensors")
    ]
    loaded = load_fusion(tiny_bert_classifier(), tmp_path / "saved", fusion_name="f")
    assert loaded.active_adapters == ["f"] and sorted(loaded.configs) == ["a", "b", "f"]
    assert torch.equal(logits(loaded, tokens), expected)
    saved, restored = model.adapter_state_dict("f"), loaded.adapter_state_dict("f")
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_fusion(tiny_bert_classifier(), tmp_path / "saved", is_trainable=True)
    assert trainable.trainable_parameters().trainable == sum(t.numel() for t in saved.values())


def test_load_fusion_refuses_name_clashes_and_incomplete_folders(tmp_path):
    model = trained_fusion()
    save_fusion(model, tmp_path / "saved", "f")
    with pytest.raises(ValueError, match=r"already has adapters named \['a', 'b', 'f'\]"):
        load_fusion(model, tmp_path / "saved", fusion_name="f")
    with pytest.raises(ValueError, match="not a fusion"):
        save_fusion(model, tmp_path / "other", "a")
    for path in (tmp_path / "saved" / "adapters" / "b").iterdir():
        path.unlink()
    (tmp_path / "saved" / "adapters" / "b").rmdir()
    with pytest.raises(dt.AdapterFileError, match=r"lacks the fused adapters \['b'\]"):
        load_fusion(tiny_bert_classifier(), tmp_path / "saved")


# -- learning ---------------------------------------------------------------------------------
LENGTH = 12
# Two tasks with the same three labels and their own vocabularies (like two text domains): every
# token of an example comes from its label's range, and the ranges differ between the tasks.
LABEL_RANGES = {"one": [(10, 20), (20, 30), (30, 40)], "two": [(70, 80), (50, 60), (60, 70)]}


def task_examples(task: str, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        label = int(torch.randint(0, 3, (1,), generator=generator))
        ids = torch.randint(*LABEL_RANGES[task][label], (LENGTH,), generator=generator)
        examples.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": torch.tensor(label)})
    return examples


def accuracy(model: dt.DeltaModel, examples: list[dict[str, torch.Tensor]]) -> float:
    tokens, labels = torch.stack([e["input_ids"] for e in examples]), torch.stack([e["labels"] for e in examples])
    return (logits(model, tokens).argmax(-1) == labels).float().mean().item()


def fit(model: dt.DeltaModel, examples: list[dict], steps: int, lr: float = 1e-2) -> None:
    train(model, examples, TrainConfig(max_steps=steps, batch_size=16, lr=lr, progress=False, log_every=0, device="cpu"))


def test_fusion_of_two_task_adapters_beats_the_weaker_adapter_on_mixed_data():
    # The adapters normalise their input: the sublayer outputs of a randomly initialised tiny BERT
    # are ~0.1 in scale, too small for an adapter to learn from in a few dozen steps.
    config = adapter_config("houlsby", layer_norm=True)
    model = dt.wrap(tiny_bert_classifier(), config, adapter_name="a")
    fit(model, task_examples("one", 256, seed=1), steps=80)
    model.add_adapter("b", config, activate=True)
    fit(model, task_examples("two", 256, seed=2), steps=80)
    with_fusion(model)
    fit(model, task_examples("one", 128, seed=3) + task_examples("two", 128, seed=4), steps=80)

    held_out = {task: task_examples(task, 96, seed=seed) for task, seed in (("one", 5), ("two", 6))}
    mixed = held_out["one"] + held_out["two"]
    scores = {}
    for name in ("a", "b", "f"):
        model.set_adapter(name)
        scores[name] = {"mixed": accuracy(model, mixed), **{task: accuracy(model, data) for task, data in held_out.items()}}
    assert scores["a"]["one"] > 0.9 and scores["b"]["two"] > 0.9, scores  # each adapter learned its task
    weaker = min(scores["a"]["mixed"], scores["b"]["mixed"])
    assert scores["f"]["mixed"] > weaker + 0.2 and scores["f"]["mixed"] > 0.85, scores
