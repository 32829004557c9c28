"""The learning-rate range test: restores the model, and suggests a rate that trains well."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import deltatune as dt
from deltatune.train import TrainConfig, train
from deltatune.train.lr_range import lr_range_test, suggest


def rows(count: int = 64) -> list[dict[str, torch.Tensor]]:
    # A learnable pattern: every sequence counts up from a random start.
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 80, (count,), generator=generator)
    return [{"input_ids": torch.arange(s, s + 12), "labels": torch.arange(s, s + 12)} for s in starts.tolist()]


def final_loss(lr: float) -> float:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    result = train(model, rows(), TrainConfig(max_steps=25, batch_size=8, lr=lr, progress=False, device="cpu", warmup_ratio=0.0))
    return sum(result.losses[-5:]) / 5


def test_the_test_restores_the_model_and_suggests_a_rate_that_beats_both_ends():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_range_test(model, rows(), batch_size=8, min_lr=1e-6, max_lr=3.0, steps=40, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained nothing
    assert len(result.lrs) == len(result.losses) > 5 and result.lrs == sorted(result.lrs)
    assert 1e-6 < result.suggested_lr < 3.0
    assert final_loss(result.suggested_lr) < min(final_loss(1e-6), final_loss(3.0))


def test_suggestion_stays_below_the_minimum():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    losses = [5 - 0.1 * i for i in range(15)] + [3.5 + 0.5 * i for i in range(10)]  # minimum at lrs[14]
    assert suggest(lrs, losses) <= lrs[14] / 10


def test_bad_arguments_are_refused():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    with pytest.raises(ValueError, match="min_lr < max_lr"):
        lr_range_test(model, rows(), min_lr=1.0, max_lr=1e-3)
