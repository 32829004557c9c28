"""The fused training path is an explicit choice, scoped to one wrapped model and fully undone."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch

import deltatune as dt
from deltatune.config import ConfigError


def transformers_state() -> dict[str, dict[str, object]]:
    """Every attribute of every loaded transformers module: what a process-wide patch would change."""
    return {name: dict(vars(module)) for name, module in list(sys.modules.items())
            if name.startswith("transformers") and module is not None}


def assert_unchanged(before: dict[str, dict[str, object]]) -> None:
    for name, attributes in before.items():
        now = vars(sys.modules[name])
        changed = [key for key, value in attributes.items() if now.get(key) is not value]
        assert not changed, f"{name}: {changed[:5]}"


def class_snapshot(model: torch.nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def no_deltatune_traces(model: torch.nn.Module) -> bool:
    return not any(key.startswith("_deltatune") for module in model.modules() for key in vars(module)) and not any(
        type(module).__module__.startswith("deltatune") for module in model.modules())


def lora() -> dt.LoraConfig:
    return dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)


@pytest.mark.parametrize("finish", ["merge_and_unload", "unwrap", "delete_last_adapter", "set_fused_false"])
def test_fused_path_patches_only_the_wrapped_model_and_is_undone(finish):
    tokens = token_batch()
    bystander = tiny_llama(seed=1)
    with torch.no_grad():
        bystander_before = bystander(input_ids=tokens).logits
    transformers_before = transformers_state()
    base = tiny_llama()
    classes_before = class_snapshot(base)

    model = dt.wrap(base, lora(), fused=True)
    assert model.is_fused and model.fused is True
    assert any(type(m).__module__ == "deltatune.kernels.patch" for m in base.modules())
    with torch.no_grad():
        fused_out = model(input_ids=tokens).logits
        model.set_fused(False)
        assert not model.is_fused
        plain_out = model(input_ids=tokens).logits
        model.set_fused(True)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)  # the same function
    # Nothing outside the wrapped model changed: transformers' modules, and a second model.
    assert_unchanged(transformers_before)
    with torch.no_grad():
        assert torch.equal(bystander(input_ids=tokens).logits, bystander_before)

    if finish == "merge_and_unload":
        result = model.merge_and_unload()
    elif finish == "unwrap":
        result = model.unwrap()
    elif finish == "delete_last_adapter":
        model.delete_adapter("default")
        result = model.model
    else:
        model.set_fused(False)
        assert not model.is_fused
        return
    assert result is base and not model.is_fused
    assert class_snapshot(result) == classes_before
    assert no_deltatune_traces(result)
    assert_unchanged(transformers_before)
    with torch.no_grad():
        assert torch.equal(bystander(input_ids=tokens).logits, bystander_before)
    if finish != "merge_and_unload":  # unwrapped without merging: the base computes what it did
        fresh = tiny_llama()
        with torch.no_grad():
            assert torch.equal(result(input_ids=tokens).logits, fresh(input_ids=tokens).logits)


def test_auto_patches_a_cuda_model_only_and_off_is_off():
    model = dt.wrap(tiny_llama(), lora())  # fused="auto" on the CPU: nothing is patched
    assert model.fused == "auto" and not model.is_fused
    assert not dt.wrap(tiny_llama(), lora(), fused=False).is_fused
    # A method that does not gain from it (IA3) is not patched under "auto", but may be forced.
    assert dt.wrap(tiny_llama(), dt.IA3Config(), fused=True).is_fused


@pytest.mark.parametrize("bad", ["true", "yes", 1, 0, None])
def test_fused_choice_must_be_auto_true_or_false(bad):
    with pytest.raises(ConfigError, match="fused must be one of"):
        dt.DeltaModel(tiny_llama(), lora(), fused=bad)


def test_fused_true_on_an_architecture_without_a_fused_path_is_an_error():
    base = tiny_gpt2()
    with pytest.raises(ConfigError, match="no fused training path.*llama"):
        dt.wrap(base, lora(), fused=True)
    assert all(p.requires_grad for p in base.parameters())  # refused before the model was touched
    # "auto" and False are fine there: the plain path runs.
    assert not dt.wrap(tiny_gpt2(), lora()).is_fused


def test_load_takes_the_fused_choice(tmp_path):
    path = dt.wrap(tiny_llama(), lora()).save(tmp_path / "adapter")
    assert dt.load(tiny_llama(), path, fused=True).is_fused
    assert not dt.load(tiny_llama(), path).is_fused


def test_fused_mlp_with_lora_dropout_runs_in_eval_mode_and_equals_the_plain_path():
    """Dropout is off in eval mode, so the one-node MLP applies; it must not refuse the layers."""
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False), fused=True).eval()
    tokens = token_batch()
    with torch.no_grad():
        fused = model(input_ids=tokens).logits
        model.set_fused(False)
        plain = model(input_ids=tokens).logits
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
