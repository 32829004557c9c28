"""AdaLoRA: SVD-form updates, importance-driven rank budget, pruned save/load, merge, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import deltatune as dt
from deltatune.methods.adalora import (
    AdaLoraLinear, adalora_callback, adalora_orthogonality_loss, adalora_step, budget_at,
)

MODULES = 14  # tiny_llama(layers=2): 7 linear layers per block


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def schedule(**changes) -> dt.AdaLoraConfig:
    fields = {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 40, "tinit": 5, "tfinal": 10, "deltaT": 5}
    return dt.AdaLoraConfig(**{**fields, **changes})


def toy_model() -> nn.Module:
    base = tiny_llama(hidden=64)
    # A random head at init scale 0.02 caps the logits near zero; pretrained heads are larger.
    with torch.no_grad():
        base.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    return base


TOKENS = (torch.arange(0, 96).reshape(4, 24) * 7) % 101  # next token = this one + 7 (mod 101)


def task_loss(model) -> float:
    with torch.no_grad():
        return model(input_ids=TOKENS, labels=TOKENS).loss.item()


def kept_ranks(model) -> dict[str, int]:
    return {name: layer.rank("default") for name, layer in model.delta_layers() if isinstance(layer, AdaLoraLinear)}


@pytest.fixture(scope="module")
def trained():
    """A model trained through the whole schedule, with what was measured along the way."""
    model = dt.wrap(toy_model(), schedule())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    penalty_before, loss_before = adalora_orthogonality_loss(model).item(), task_loss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    budgets = []
    model.train()
    for step in range(1, 41):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss  # the penalty is already in it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adalora_callback(step, model, optimizer)
        budgets.append(sum(kept_ranks(model).values()))
    model.eval()
    penalty_after = adalora_orthogonality_loss(model).item()
    return {"model": model, "frozen": frozen, "budgets": budgets, "penalty": (penalty_before, penalty_after),
            "loss": (loss_before, task_loss(model))}


# -- the schedule and what training does -------------------------------------------------------------
def test_budget_schedule_warms_up_falls_cubically_then_holds_the_target():
    config = schedule()
    budgets = [budget_at(config, step, MODULES) for step in range(1, 41)]
    assert all(b == (4 * MODULES, False) for b in budgets[:5])  # warm-up: full budget, no masking
    falling = [b for b, _ in budgets[5:30]]
    assert falling == sorted(falling, reverse=True) and falling[0] < 4 * MODULES
    assert [step for step, (_, now) in enumerate(budgets, start=1) if now] == [10, 15, 20, 25, 30]
    assert all(b == 2 * MODULES for b, _ in budgets[29:])
    assert budget_at(config, 18, MODULES)[0] == int(2 * MODULES * (1 - 13 / 25) ** 3 + 2 * MODULES)


def test_training_reaches_the_target_budget_with_uneven_ranks(trained):
    model = trained["model"]
    ranks = kept_ranks(model)
    assert sum(ranks.values()) == 2 * MODULES  # the target total rank, exactly
    assert len(set(ranks.values())) > 1  # importance moved rank between modules
    assert model.configs["default"].rank_pattern == ranks
    assert trained["budgets"][:9] == [4 * MODULES] * 9 and trained["budgets"][-11:] == [2 * MODULES] * 11
    for name, layer in model.delta_layers():  # pruned triplets contribute nothing
        if isinstance(layer, AdaLoraLinear):
            assert not layer.lora_E["default"][~layer.kept["default"]].any(), name


def test_orthogonality_penalty_falls_task_loss_falls_and_base_is_untouched(trained):
    penalty_before, penalty_after = trained["penalty"]
    assert penalty_after < 0.5 * penalty_before
    loss_before, loss_after = trained["loss"]
    assert loss_after < 0.5 * loss_before
    frozen = {n: p for n, p in trained["model"].named_parameters() if not p.requires_grad}
    assert frozen.keys() == trained["frozen"].keys()
    assert all(torch.equal(frozen[k], trained["frozen"][k]) for k in frozen)


def test_trainable_parameters_equal_the_hand_count():
    model = dt.wrap(tiny_llama(), schedule(target_modules=["q_proj", "v_proj"]))
    # Per module: Q (r × in), λ (r), P (out × r); tiny_llama: q_proj 32 -> 32, v_proj 32 -> 16 (GQA).
    assert model.trainable_parameters().trainable == 2 * 4 * ((32 + 1 + 32) + (32 + 1 + 16))


# -- files and merging -------------------------------------------------------------------------------
def test_save_load_restores_pruned_shapes_and_identical_outputs(trained, tmp_path):
    model = trained["model"]
    out = model(input_ids=TOKENS).logits
    path = model.save(tmp_path / "adapter")
    loaded = dt.load(toy_model(), path)
    assert kept_ranks(loaded) == kept_ranks(model)
    for name, layer in loaded.delta_layers():
        rank = model.configs["default"].rank_pattern[name]
        assert layer.lora_A["default"].shape == (rank, layer.in_features)
        assert layer.lora_B["default"].shape == (layer.out_features, rank)
    assert relative_error(loaded(input_ids=TOKENS).logits, out) < 1e-6


def test_merge_equals_unmerged_and_unloads(trained):
    model = trained["model"]
    out = model(input_ids=TOKENS).logits
    model.merge()
    assert relative_error(model(input_ids=TOKENS).logits, out) < 1e-5
    model.unmerge()
    assert relative_error(model(input_ids=TOKENS).logits, out) < 1e-6


def test_gpt2_conv1d_targets_merge():
    model = dt.wrap(tiny_gpt2(), schedule())
    randomize_adapters(model)
    tokens = token_batch()
    out = model(input_ids=tokens).logits
    plain = model.merge_and_unload()
    assert relative_error(plain(input_ids=tokens).logits, out) < 1e-5


def test_the_training_loop_drives_the_schedule_through_its_step_callback():
    from deltatune.train.loop import TrainConfig, train

    model = dt.wrap(tiny_llama(), schedule(total_step=8, tinit=1, tfinal=2, deltaT=2, target_modules=["q_proj", "v_proj"]))
    data = [{"input_ids": TOKENS[i, :12], "labels": TOKENS[i, :12]} for i in range(4)]
    config = TrainConfig(max_steps=8, batch_size=2, lr=1e-2, warmup_ratio=0.0, progress=False, device="cpu")
    train(model, data, config)  # the loop reaches adalora_step through the wrapper's after-step hook
    assert sum(kept_ranks(model).values()) == 2 * 4


# -- bad input -----------------------------------------------------------------------------------
def test_bad_configs_are_clear_errors():
    with pytest.raises(dt.ConfigError, match="target_r=16 is above init_r=8"):
        dt.AdaLoraConfig(init_r=8, target_r=16, total_step=100)
    with pytest.raises(dt.ConfigError, match="needs total_step"):
        dt.AdaLoraConfig()
    with pytest.raises(dt.ConfigError, match="leave no budgeting phase"):
        dt.AdaLoraConfig(total_step=100, tinit=60, tfinal=40)
    with pytest.raises(TypeError, match="needs the model returned by dt.wrap"):
        adalora_step(tiny_llama(), 1)


def test_peft_rank_patterns_are_read():
    config = dt.AdaLoraConfig.from_dict(
        {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "r": 8,
         "rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False]}},
        foreign_ok=True,
    )
    assert config.rank_pattern == {"model.layers.0.self_attn.q_proj": 2}


def test_adapters_trained_by_peft_load_with_the_same_outputs(tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2,
                                                            target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    tokens = token_batch()
    for step in range(6):
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
        # peft scales by alpha / (init_r + 1e-5), deltatune by alpha / init_r: equal to ~1e-6.
        assert relative_error(dt.load(tiny_llama(), tmp_path)(input_ids=tokens).logits, expected) < 1e-5
