"""Weighted combination of LoRA adapters (deltatune.methods.lora.combine, DeltaModel.add_weighted_adapter)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import deltatune as dt
from deltatune.methods.lora.combine import (
    CombinationReport, dare_drop, dare_linear_merge, dare_ties_merge, disjoint_merge, drop_and_rescale, elect_sign,
    magnitude_trim, random_keep_mask, ties_merge, truncated_svd,
)
from deltatune.methods.lora import LoraLinear


def two_adapters(build=tiny_llama, configs=None) -> dt.DeltaModel:
    """Adapters "a" (r=4, scaling 2) and "b" (r=2, rsLoRA scaling 3/√2), both with B != 0; "a" active."""
    config_a, config_b = configs or (dt.LoraConfig(r=4, lora_alpha=8), dt.LoraConfig(r=2, lora_alpha=3, use_rslora=True))
    model = dt.wrap(build(), config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    model.set_adapter(["a", "b"])
    randomize_adapters(model, seed=3, scale=0.2)
    model.set_adapter("a")
    return model


def logits(model, names, tokens=None) -> torch.Tensor:
    model.set_adapter(names)
    with torch.no_grad():
        return model(input_ids=token_batch() if tokens is None else tokens).logits


def lora_layers(model) -> dict[str, LoraLinear]:
    return {path: layer for path, layer in model.delta_layers() if isinstance(layer, LoraLinear)}


def exact_delta(layer, weights: dict[str, float]) -> torch.Tensor:
    """Σ w_i Δ_i of one layer, in the stored weight's orientation."""
    return sum(w * layer.delta_weight(name) for name, w in weights.items() if name in layer.adapter_names)


# -- tensor functions against hand-computed values ---------------------------------------------
TIES_INPUTS = [
    torch.tensor([[2.0, -1.0, 0.0], [1.0, 4.0, -3.0]]),
    torch.tensor([[-5.0, -2.0, 1.0], [1.0, -1.0, -1.0]]),
    torch.tensor([[1.0, 3.0, 0.0], [-1.0, -1.0, 2.0]]),
]


def test_magnitude_trim_keeps_the_largest_entries():
    tensor = torch.tensor([[1.0, -4.0, 2.0], [-3.0, 0.5, 6.0]])
    assert torch.equal(magnitude_trim(tensor, 0.5), torch.tensor([[0.0, -4.0, 0.0], [-3.0, 0.0, 6.0]]))
    assert torch.equal(magnitude_trim(tensor, 1.0), tensor)
    assert torch.equal(magnitude_trim(tensor, 1 / 6), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 6.0]]))


def test_elect_sign_total_and_frequency():
    # Sums: [[-2, 0, 1], [1, 2, -2]]; a tie (0) elects +1.
    assert torch.equal(elect_sign(TIES_INPUTS, "total"), torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, -1.0]]))
    # Positives minus negatives: [[1, -1, 1], [1, -1, -1]].
    assert torch.equal(elect_sign(TIES_INPUTS, "frequency"), torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]]))


def test_disjoint_merge_averages_the_values_agreeing_with_the_sign():
    by_total = disjoint_merge(TIES_INPUTS, torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, -1.0]]))
    assert torch.equal(by_total, torch.tensor([[-5.0, 3.0, 1.0], [1.0, 4.0, -2.0]]))
    by_frequency = disjoint_merge(TIES_INPUTS, torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]]))
    assert torch.equal(by_frequency, torch.tensor([[1.5, -1.5, 1.0], [1.0, -1.0, -2.0]]))
    # No agreeing value: 0.
    assert torch.equal(disjoint_merge([torch.tensor([[-1.0, 0.0]])], torch.tensor([[1.0, -1.0]])), torch.zeros(1, 2))


def test_ties_merge_on_a_3x3_example():
    u = torch.tensor([[4.0, -1.0, 0.5], [0.0, -6.0, 2.0], [1.0, 0.2, -3.0]])
    v = torch.tensor([[-2.0, 5.0, 0.1], [1.0, -3.0, 7.0], [0.3, -0.4, 1.0]])
    w = torch.tensor([[3.0, 0.2, -0.3], [-0.5, -2.0, 0.7], [-4.0, 0.6, -1.5]])
    # Trimmed to 3 entries each: u → {4, -6, -3}, v → {5, -3, 7}, w → {3, -2, -4}.
    # Trimmed sum [[7, 5, 0], [0, -11, 7], [-4, 0, -3]] elects [[+, +, +], [+, -, +], [-, +, -]].
    expected = torch.tensor([[3.5, 5.0, 0.0], [0.0, -11.0 / 3.0, 7.0], [-4.0, 0.0, -3.0]])
    assert torch.allclose(ties_merge([u, v, w], density=1 / 3), expected)


DARE_INPUTS = [
    torch.tensor([[2.0, -4.0, 1.0], [0.0, 3.0, -1.0], [5.0, -2.0, 2.0]]),
    torch.tensor([[3.0, 2.0, 3.0], [4.0, -3.0, 1.0], [-5.0, -2.0, 6.0]]),
]
DARE_MASKS = [
    torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool),
    torch.tensor([[1, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
]


def test_drop_and_rescale_by_hand():
    tensor = torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]])
    keep = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(drop_and_rescale(tensor, keep, 0.5), torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 12.0]]))


def test_dare_merges_on_a_3x3_example_with_given_masks():
    # Kept and doubled: p' = [[4, -8, 0], [0, 0, -2], [10, -4, 0]], q' = [[6, 0, 6], [8, -6, 0], [-10, -4, 12]].
    summed = torch.tensor([[10.0, -8.0, 6.0], [8.0, -6.0, -2.0], [0.0, -8.0, 12.0]])
    assert torch.equal(dare_linear_merge(DARE_INPUTS, 0.5, keep_masks=DARE_MASKS), summed)
    # Signs of the sum, the tie at (2, 0) elects +: the mean of the agreeing values.
    merged = torch.tensor([[5.0, -8.0, 6.0], [8.0, -6.0, -2.0], [10.0, -4.0, 12.0]])
    assert torch.equal(dare_ties_merge(DARE_INPUTS, 0.5, keep_masks=DARE_MASKS), merged)


def test_dare_drop_is_seeded_and_keeps_expected_values():
    tensor = torch.randn(40, 50)
    first = dare_drop(tensor, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(first, dare_drop(tensor, 0.3, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, dare_drop(tensor, 0.3, torch.Generator().manual_seed(8)))
    mask = random_keep_mask(tensor.shape, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(first, torch.where(mask, tensor / 0.3, torch.zeros(())))
    assert 0.2 < mask.float().mean() < 0.4
    assert torch.equal(dare_linear_merge([tensor, 2 * tensor], 1.0), tensor + 2 * tensor)


def test_truncated_svd_by_hand():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    one = truncated_svd(matrix, 1)
    assert torch.allclose(one.B @ one.A, torch.diag(torch.tensor([3.0, 0.0, 0.0])), atol=1e-6)
    assert one.relative_error == pytest.approx(math.sqrt(5 / 14), rel=1e-6)
    padded = truncated_svd(matrix, 5)  # more rank than singular values: zero-padded, exact
    assert padded.B.shape == (3, 5) and padded.A.shape == (5, 3)
    assert torch.allclose(padded.B @ padded.A, matrix, atol=1e-6) and padded.relative_error < 1e-6


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: magnitude_trim(torch.ones(3), -0.1), "in \\(0, 1\\]"),
        (lambda: magnitude_trim(torch.ones(3), 1.5), "in \\(0, 1\\]"),
        (lambda: elect_sign([torch.ones(3)], "majority"), "majority_sign_method"),
        (lambda: dare_linear_merge([torch.ones(3)], 0.5, keep_masks=[]), "one keep mask per task tensor"),
        (lambda: truncated_svd(torch.ones(3), 1), "2-D"),
        (lambda: truncated_svd(torch.ones(3, 3), 0), "positive integer"),
    ],
)
def test_tensor_functions_refuse_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- combinations on models ----------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_linear_with_weights_one_zero_reproduces_the_first_adapter(build):
    configs = (dt.LoraConfig(r=4, lora_alpha=8), dt.LoraConfig(r=4, lora_alpha=3, use_rslora=True))
    model = two_adapters(build, configs)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "mix", combination="linear")
    assert model.active_adapters == ["a"]  # added inactive
    assert relative_error(logits(model, "mix"), logits(model, "a")) < 1e-5
    assert report.max_error < 1e-5  # no cross terms with one non-zero weight
    mixed = model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "blend", combination="linear")
    assert mixed.max_error > 1e-3  # cross terms B_a A_b, B_b A_a are reported


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_cat_with_unit_weights_equals_both_adapters_active(build):
    model = two_adapters(build)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination="cat")
    assert set(report.ranks.values()) == {6} and report.overall_error == 0.0
    assert relative_error(logits(model, "mix"), logits(model, ["a", "b"])) < 1e-5


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_cat_equals_the_exact_weighted_sum_of_deltas(build):
    model = two_adapters(build)
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", combination="cat")
    for path, layer in lora_layers(model).items():
        assert torch.allclose(layer.delta_weight("mix"), exact_delta(layer, {"a": 0.7, "b": -1.3}), atol=1e-6), path


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_svd_at_full_rank_is_exact_and_matches_cat(build):
    model = two_adapters(build)
    cat = model.add_weighted_adapter(["a", "b"], [0.6, 1.4], "cat", combination="cat")
    svd = model.add_weighted_adapter(["a", "b"], [0.6, 1.4], "svd", combination="svd", rank=6)
    assert svd.max_error < 1e-5 and cat.max_error == 0.0
    assert relative_error(logits(model, "svd"), logits(model, "cat")) < 1e-5


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_svd_at_low_rank_reports_the_discarded_part(build):
    model = two_adapters(build)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 0.8], "mix", combination="svd", rank=2)
    assert set(report.ranks.values()) == {2}
    discarded = total = 0.0
    for path, layer in lora_layers(model).items():
        exact = exact_delta(layer, {"a": 1.0, "b": 0.8})
        singular = torch.linalg.svdvals(exact)
        expected = (singular[2:].norm() / singular.norm()).item()
        assert report.layer_errors[path] == pytest.approx(expected, rel=1e-4), path
        # Eckart–Young: what the new adapter actually misses is the discarded part.
        assert relative_error(layer.delta_weight("mix"), exact) == pytest.approx(expected, rel=1e-3), path
        discarded, total = discarded + singular[2:].norm().item() ** 2, total + singular.norm().item() ** 2
    assert report.max_error > 0.01
    assert report.overall_error == pytest.approx(math.sqrt(discarded / total), rel=1e-4)
    assert report.mean_error == pytest.approx(sum(report.layer_errors.values()) / len(report.layer_errors))
    text = str(report)
    assert "'mix' = svd(1·a, 0.8·b)" in text and "overall" in text and "largest layer errors" in text


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_ties_in_the_model_equals_the_tensor_function(build):
    # TIES acts entry by entry, so the stored orientation (GPT-2 Conv1D: in × out) does not matter;
    # at rank 32 (= the smallest side of every layer) the SVD keeps everything.
    model = two_adapters(build)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination="ties", density=0.3, rank=32)
    assert report.max_error < 1e-5
    for path, layer in lora_layers(model).items():
        expected = ties_merge([layer.delta_weight("a"), 0.5 * layer.delta_weight("b")], 0.3)
        assert torch.allclose(layer.delta_weight("mix"), expected, atol=1e-5), path
    frequency = model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "freq", "ties", density=0.3, rank=32, majority_sign_method="frequency")
    assert frequency.max_error < 1e-5


def test_dare_at_density_one_equals_the_exact_sum():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "dare", combination="dare_linear", density=1.0, rank=6)
    assert relative_error(logits(model, "dare"), logits(model, ["a", "b"])) < 1e-5


def test_dare_is_reproducible_with_a_seed():
    model = two_adapters()
    for name, seed in (("one", 11), ("two", 11), ("other", 12)):
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], name, combination="dare_ties", density=0.5, seed=seed)
    layer = next(iter(lora_layers(model).values()))
    assert torch.equal(layer.delta_weight("one"), layer.delta_weight("two"))
    assert not torch.equal(layer.delta_weight("one"), layer.delta_weight("other"))


def test_layers_only_some_sources_adapt_count_as_zero_deltas_and_round_trip(tmp_path):
    configs = (dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), dt.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    model = two_adapters(tiny_llama, configs)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination="cat")
    ranks = {path.rsplit(".", 1)[-1]: rank for path, rank in report.ranks.items()}
    assert ranks == {"q_proj": 4, "v_proj": 6, "o_proj": 2}  # per-layer ranks go into rank_pattern
    combined = logits(model, "mix")
    assert relative_error(combined, logits(model, ["a", "b"])) < 1e-5
    model.save(tmp_path / "mix", "mix")
    loaded = dt.load(tiny_llama(), tmp_path / "mix")
    assert torch.equal(logits(loaded, "default"), combined)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_save_load_round_trip_is_bit_exact_and_merges(build, tmp_path):
    model = two_adapters(build)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination="ties", density=0.5, rank=3)
    combined = logits(model, "mix")
    model.save(tmp_path / "mix", "mix")
    loaded = dt.load(build(), tmp_path / "mix", adapter_name="mix")
    assert torch.equal(logits(loaded, "mix"), combined)
    model.merge(["mix"])
    assert relative_error(logits(model, "mix"), combined) < 1e-5


def test_embedding_and_conv2d_layers_combine():
    model = two_adapters(tiny_llama, (dt.LoraConfig(r=3, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
                                      dt.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination="svd", rank=5)
    assert relative_error(logits(model, "mix"), logits(model, ["a", "b"])) < 1e-5

    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    config = dt.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    model = dt.wrap(convs, config, adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination="svd", rank=5)
    images = torch.randn(2, 3, 9, 9)
    model.set_adapter(["a", "b"])
    both = model(images)
    model.set_adapter("mix")
    assert relative_error(model(images), both) < 1e-5


def test_modules_to_save_copies_combine_as_deltas_from_the_original():
    configs = (dt.LoraConfig(r=2, modules_to_save=["classifier"]), dt.LoraConfig(r=2, modules_to_save=["classifier"]))
    model = two_adapters(tiny_bert_classifier, configs)
    report = model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "first", combination="linear")
    assert report.modules_to_save == ["classifier"]
    assert relative_error(logits(model, "first"), logits(model, "a")) < 1e-5
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mean", combination="cat")
    head = model.model.classifier
    average = (head.modules_to_save["a"].weight + head.modules_to_save["b"].weight) / 2
    assert torch.allclose(head.modules_to_save["mean"].weight, average, atol=1e-6)
    assert model.configs["mean"].modules_to_save == ["classifier"]


# -- what is refused -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((["a", "zz"], [1, 1], "mix"), {}, ValueError, "No adapter named \\['zz'\\]"),
        (("a", [1], "mix"), {}, ValueError, "non-empty list of adapter names"),
        ((["a", "b"], [1.0], "mix"), {}, ValueError, "one weight per adapter"),
        ((["a", "b"], [1.0, float("nan")], "mix"), {}, ValueError, "finite numbers"),
        ((["a", "b"], [1, 1], "b"), {}, ValueError, "already exists"),
        ((["a", "b"], [1, 1], "mix", "tie"), {"density": 0.5}, ValueError, "Did you mean 'ties'"),
        ((["a", "b"], [1, 1], "mix", "ties"), {}, ValueError, "needs density"),
        ((["a", "b"], [1, 1], "mix", "ties"), {"density": -0.2}, ValueError, "in \\(0, 1\\]"),
        ((["a", "b"], [1, 1], "mix", "dare_ties"), {"density": 1.5}, ValueError, "in \\(0, 1\\]"),
        ((["a", "b"], [1, 1], "mix", "svd"), {"density": 0.5}, ValueError, "density applies to"),
        ((["a", "b"], [1, 1], "mix", "cat"), {"rank": 4}, ValueError, "rank applies to"),
        ((["a", "b"], [1, 1], "mix", "svd"), {"rank": 0}, ValueError, "positive integer"),
        ((["a", "b"], [1, 1], "mix", "ties"), {"density": 0.5, "majority_sign_method": "max"}, ValueError, "majority_sign_method"),
        ((["a", "b"], [1, 1], "mix", "linear"), {}, ValueError, "same rank .* Use combination='cat'"),
    ],
)
def test_bad_requests_are_refused_and_leave_the_model_unchanged(args, kwargs, error, message):
    model = two_adapters()
    with pytest.raises(error, match=message):
        model.add_weighted_adapter(*args, **kwargs)
    assert model.adapter_names == ["a", "b"] and model.active_adapters == ["a"]


def test_non_lora_dora_and_pissa_sources_are_refused():
    model = two_adapters()
    dt.wrap(model, dt.IA3Config(), adapter_name="ia3")
    with pytest.raises(TypeError, match="'ia3' adapter; only LoRA"):
        model.add_weighted_adapter(["a", "ia3"], [1, 1], "mix")
    model.add_adapter("dora", dt.LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA"):
        model.add_weighted_adapter(["a", "dora"], [1, 1], "mix")
    pissa = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, init_lora_weights="pissa"), adapter_name="p")
    with pytest.raises(ValueError, match="PiSSA"):
        pissa.add_weighted_adapter(["p"], [1.0], "mix")


def test_report_is_a_dataclass_with_readable_text():
    report = CombinationReport("mix", "cat", ["a", "b"], [1.0, 2.0], {"x.q": 6}, {"x.q": 0.0}, 0.0)
    assert report.max_error == 0.0 and report.mean_error == 0.0
    assert str(report).startswith("Adapter 'mix' = cat(1·a, 2·b): rank 6 over 1 layers")
