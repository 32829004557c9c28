"""Hot swap: load, unload and replace adapters on a live model without rebuilding it."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_llama, token_batch

import deltatune as dt


def saved_lora(tmp_path, name: str, seed: int, r: int = 4):
    """An adapter folder with random (non-zero) weights, trained on nothing."""
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=seed)
    model.save(tmp_path / name)
    return tmp_path / name, model(input_ids=token_batch()).logits.detach()


def test_same_shape_replacement_is_in_place_and_gives_the_new_output(tmp_path):
    first, _ = saved_lora(tmp_path, "v1", seed=1)
    second, expected = saved_lora(tmp_path, "v2", seed=2)
    model = dt.load(tiny_llama(), first, adapter_name="task")
    params_before = {name: (param, param.data_ptr()) for name, param in model.named_parameters()}
    assert model.replace_adapter(second, "task") == "in_place"
    for name, param in model.named_parameters():
        assert params_before[name][0] is param and params_before[name][1] == param.data_ptr()
    assert relative_error(model(input_ids=token_batch()).logits, expected) < 1e-6


def test_replacing_in_place_does_not_recompile_a_compiled_model(tmp_path):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    first, _ = saved_lora(tmp_path, "v1", seed=1)
    second, expected = saved_lora(tmp_path, "v2", seed=2)
    model = dt.load(tiny_llama(), first, adapter_name="task")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    tokens = token_batch()
    with torch.no_grad():
        compiled(input_ids=tokens)
        compiled(input_ids=tokens)
        compiles = counter.frame_count
        assert compiles >= 1
        model.replace_adapter(second, "task")
        swapped = compiled(input_ids=tokens).logits
    assert counter.frame_count == compiles  # no recompilation
    assert relative_error(swapped, expected) < 1e-5


def test_another_rank_rebuilds_under_the_same_name_and_keeps_it_active(tmp_path):
    first, _ = saved_lora(tmp_path, "r4", seed=1, r=4)
    second, expected = saved_lora(tmp_path, "r8", seed=2, r=8)
    model = dt.load(tiny_llama(), first, adapter_name="task")
    assert model.replace_adapter(second, "task") == "rebuilt"
    assert model.active_adapters == ["task"] and model.configs["task"].r == 8
    assert relative_error(model(input_ids=token_batch()).logits, expected) < 1e-6


def test_a_bad_replacement_leaves_the_adapter_serving(tmp_path):
    first, expected = saved_lora(tmp_path, "v1", seed=1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((first / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    model = dt.load(tiny_llama(), first, adapter_name="task")
    with pytest.raises(Exception):
        model.replace_adapter(broken, "task")
    assert relative_error(model(input_ids=token_batch()).logits, expected) < 1e-6


def test_replace_needs_an_existing_unmerged_adapter(tmp_path):
    first, _ = saved_lora(tmp_path, "v1", seed=1)
    model = dt.load(tiny_llama(), first, adapter_name="task")
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        model.replace_adapter(first, "other")
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.replace_adapter(first, "task")


def test_load_and_unload_on_a_live_model_keep_the_base_storage(tmp_path):
    first, _ = saved_lora(tmp_path, "v1", seed=1)
    second, _ = saved_lora(tmp_path, "v2", seed=2)
    model = dt.load(tiny_llama(), first, adapter_name="a")
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    plain = model(input_ids=token_batch()).logits.detach()
    model.load_adapter(second, "b", activate=False)
    model.delete_adapter("b")
    assert {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n} == base_ptrs
    assert relative_error(model(input_ids=token_batch()).logits, plain) < 1e-7


def test_adapters_loaded_in_the_base_dtype_route_rows_in_it_and_keep_it_when_rebuilt(tmp_path):
    """A server loads adapters in a bf16 base's dtype (dtype=...): each row of a mixed batch still
    gets its own adapter, and a replacement of another shape is held in that dtype too."""
    first, _ = saved_lora(tmp_path, "a", seed=1, r=4)
    second, _ = saved_lora(tmp_path, "b", seed=2, r=8)
    model = dt.DeltaModel(tiny_llama().to(torch.bfloat16)).eval()
    model.load_adapter(first, "a", dtype=torch.bfloat16)
    model.load_adapter(second, "b", dtype=torch.bfloat16)
    assert {t.dtype for t in model.adapter_state_dict("a").values()} == {torch.bfloat16}
    tokens = token_batch(batch=4)
    names = ["a", "b", None, "a"]
    with torch.no_grad():
        mixed = model(input_ids=tokens, adapter_names=names).logits.float()
        alone = []
        for row, name in enumerate(names):
            if name is None:
                with model.disable_adapters():
                    alone.append(model(input_ids=tokens[row:row + 1]).logits.float())
            else:
                model.set_adapter(name)
                alone.append(model(input_ids=tokens[row:row + 1]).logits.float())
        with model.disable_adapters():
            base = model(input_ids=tokens).logits.float()
    for row in range(len(names)):
        assert relative_error(mixed[row], alone[row][0]) < 2e-2  # bf16 rounding only
    assert relative_error(mixed[0], base[0]) > 0.05 and relative_error(mixed[1], base[1]) > 0.05  # adapters act

    third, _ = saved_lora(tmp_path, "c", seed=3, r=2)
    assert model.replace_adapter(third, "b") == "rebuilt"
    assert {t.dtype for t in model.adapter_state_dict("b").values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        model.load_adapter(first, "d", dtype="bf16")
    assert "d" not in model.adapter_names
