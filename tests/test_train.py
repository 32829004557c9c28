"""The shared training loop: exact resume, NaN stop, schedules, accumulation, checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from deltatune.train import NonFiniteLossError, TrainConfig, latest_checkpoint, train
from deltatune.train.data import TokenizedDataset, pad_collate
from deltatune.train.loop import BatchStream, lr_multiplier, run_eval

torch.set_num_threads(2)


def tiny_bert(seed: int = 0) -> nn.Module:
    """Tiny BERT classifier with dropout on, and a frozen 'base' as in PEFT."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=101, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.2)
    model = BertForSequenceClassification(config)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier") or ".0.attention.self.query" in name
    return model


def token_dataset(count: int = 40, seed: int = 1) -> TokenizedDataset:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        input_ids = torch.randint(1, 101, (length,), generator=generator)
        examples.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                         "labels": torch.randint(0, 3, (), generator=generator)})
    return TokenizedDataset(examples, pad_collate)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Killed(RuntimeError):
    pass


def quiet(**overrides) -> TrainConfig:
    # CPU: bit-exactness is promised there (a GPU run passes too, but in bf16 autocast).
    values = dict(max_steps=6, batch_size=4, lr=1e-2, warmup_ratio=0.2, progress=False, seed=3, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def test_resume_after_kill_is_bit_identical(tmp_path):
    config = quiet(grad_accum=2, checkpoint_every=3, output_dir=str(tmp_path / "run"), resume=True)
    uninterrupted_model = tiny_bert()
    reference = train(uninterrupted_model, token_dataset(), quiet(grad_accum=2))

    def kill_at_step_4(step, model, optimizer):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_bert(), token_dataset(), config, step_callbacks=[kill_at_step_4])
    assert latest_checkpoint(config.output_dir).name == "checkpoint-00000003"

    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG it finds
    resumed_model = tiny_bert()
    resumed = train(resumed_model, token_dataset(), config)

    assert resumed.steps == 6 and resumed.stopped_reason == "completed"
    assert resumed.losses == reference.losses
    assert resumed.tokens_seen == reference.tokens_seen
    expected = trainable_state(uninterrupted_model)
    actual = trainable_state(resumed_model)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_checkpoint_holds_no_pickle_and_only_trainable_weights(tmp_path):
    from safetensors.torch import load_file

    model = tiny_bert()
    train(model, token_dataset(), quiet(max_steps=2, checkpoint_every=2, output_dir=str(tmp_path)))
    checkpoint = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert saved.keys() == trainable_state(model).keys()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 2 and state["trainer"]["data_position"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_only_trainable_parameters_change():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, token_dataset(), quiet(max_steps=3))
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, name


class PoisonableRegression(nn.Module):
    """Linear regression whose loss turns NaN once `poisoned` is set."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.poisoned = False

    def forward(self, x, y):
        loss = nn.functional.mse_loss(self.linear(x).squeeze(-1), y)
        return {"loss": loss * float("nan") if self.poisoned else loss}


def regression_data(count: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": x[i], "y": y[i]} for i in range(count)]


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    model = PoisonableRegression()

    def poison_after_step_4(step, model, optimizer):
        if step == 4:
            model.poisoned = True

    config = quiet(max_steps=10, checkpoint_every=2, output_dir=str(tmp_path))
    with pytest.raises(NonFiniteLossError) as caught:
        train(model, regression_data(), config, step_callbacks=[poison_after_step_4])
    error = caught.value
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "checkpoint-00000004"
    assert "step 5" in str(error) and str(checkpoint) in str(error)
    assert error.result.stopped_reason == "nan_loss" and error.result.steps == 4
    from safetensors.torch import load_file
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_gradient_accumulation_matches_one_big_batch():
    def run(batch_size, grad_accum):
        model = PoisonableRegression()
        train(model, regression_data(), quiet(max_steps=4, batch_size=batch_size, grad_accum=grad_accum,
                                              max_grad_norm=None, lr=0.05))
        return model.linear.weight.detach()

    # Same seed: batch k of size 8 holds exactly micro-batches 2k and 2k+1 of size 4.
    assert torch.allclose(run(8, 1), run(4, 2), atol=1e-6)
    assert not torch.allclose(run(8, 1), run(4, 1), atol=1e-6)


def test_data_order_is_a_seeded_permutation_per_epoch():
    data = list(range(10))
    collect = lambda batch: batch  # noqa: E731 - identity collate to see indices
    stream = BatchStream(data, batch_size=5, seed=7, collate_fn=collect)
    first_epoch = stream.batch(0) + stream.batch(1)
    assert sorted(first_epoch) == data
    again = BatchStream(data, batch_size=5, seed=7, collate_fn=collect)
    assert again.batch(3) == stream.batch(3)  # random access: what resume relies on
    other_seed = BatchStream(data, batch_size=5, seed=8, collate_fn=collect)
    assert other_seed.batch(0) + other_seed.batch(1) != first_epoch


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    values = [lr_multiplier(step, 100, 10, schedule) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(values[10:], values[11:]))
        assert values[-1] < 0.05
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_eval_runs_periodically_in_eval_mode_without_grad_and_restores_training():
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"answer": 42}

    model = tiny_bert()
    result = train(model, token_dataset(), quiet(max_steps=5, eval_every=2), eval_fn=eval_fn)
    assert [entry["step"] for entry in result.eval_history] == [2, 4, 5]
    assert result.eval_history[0]["answer"] == 42
    assert seen == [(False, False)] * 3
    assert model.training
    run_eval(eval_fn, model.eval())
    assert not model.training  # run_eval restores whatever mode it found


def test_step_callbacks_see_gradients_and_every_step():
    calls = []

    def probe(step, model, optimizer):
        calls.append((step, all(p.grad is not None for p in model.parameters() if p.requires_grad)))

    train(tiny_bert(), token_dataset(), quiet(max_steps=3), step_callbacks=[probe])
    assert calls == [(1, True), (2, True), (3, True)]


def test_result_reports_time_and_tokens():
    data = token_dataset()
    result = train(tiny_bert(), data, quiet(max_steps=2, batch_size=4))
    assert len(result.step_times) == 2 and all(t > 0 for t in result.step_times)
    assert result.total_time >= sum(result.step_times)
    lengths = sorted(len(example["input_ids"]) for example in data.examples)
    assert lengths[0] * 8 <= result.tokens_seen <= lengths[-1] * 8


class Wrapper(nn.Module):
    """Stands in for a DeltaModel: the Hugging Face base sits at `.model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    for name, param in model.named_parameters():
        param.requires_grad = "layers.1.self_attn.q_proj" in name  # frozen inputs, trainable inside
    return model


def lm_dataset() -> TokenizedDataset:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 101, (16, 10), generator=generator)
    return TokenizedDataset([{"input_ids": row, "labels": row.clone()} for row in ids], pad_collate)


def test_gradient_checkpointing_works_through_wrapper_with_frozen_base():
    plain = Wrapper(tiny_llama())
    checkpointed = Wrapper(tiny_llama())
    config = quiet(max_steps=2, lr=1e-2)
    train(plain, lm_dataset(), config)
    result = train(checkpointed, lm_dataset(), quiet(max_steps=2, lr=1e-2, gradient_checkpointing=True))
    base = checkpointed.model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    before = tiny_llama().model.layers[1].self_attn.q_proj.weight
    after = checkpointed.model.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(before, after)  # gradients reached the trainable layer
    assert torch.allclose(after, plain.model.model.layers[1].self_attn.q_proj.weight, atol=1e-6)
    assert all(math.isfinite(loss) for loss in result.losses)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_activations_go_through_host_storage_and_train_the_same(monkeypatch, checkpointing):
    """offload_activations: every tensor the forward saves for backward passes through
    save_on_cpu's hooks (with checkpointing: only the blocks' inputs), and training ends on the
    same weights as without it."""
    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tuple(tensor.shape)) or pack(tensor)

    plain, offloaded = Wrapper(tiny_llama()), Wrapper(tiny_llama())
    train(plain, lm_dataset(), quiet(max_steps=2, gradient_checkpointing=checkpointing))
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    train(offloaded, lm_dataset(), quiet(max_steps=2, gradient_checkpointing=checkpointing, offload_activations=True))
    assert packed, "nothing was saved through save_on_cpu"
    hidden = offloaded.model.config.hidden_size
    if checkpointing:  # each checkpointed block keeps its input (and little else) until backward
        assert sum(shape[-1:] == (hidden,) for shape in packed) >= 2 * offloaded.model.config.num_hidden_layers
    torch.testing.assert_close(trainable_state(offloaded), trainable_state(plain), rtol=0, atol=0)
    with pytest.raises(ValueError, match="offload_activations must be bool"):
        TrainConfig(offload_activations="yes")


def test_gradient_checkpointing_on_plain_module_names_the_fix():
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        train(PoisonableRegression(), regression_data(), quiet(gradient_checkpointing=True))


def test_config_errors_list_valid_choices():
    with pytest.raises(ValueError, match="linear, cosine, constant"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="auto, bf16, fp16, no"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="output_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="fp16"):
        train(PoisonableRegression(), regression_data(), quiet(mixed_precision="fp16", device="cpu"))


def test_resume_refuses_a_changed_batch_size(tmp_path):
    train(tiny_bert(), token_dataset(), quiet(max_steps=2, checkpoint_every=2, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="batch_size=4"):
        train(tiny_bert(), token_dataset(),
              quiet(max_steps=4, batch_size=8, checkpoint_every=2, output_dir=str(tmp_path), resume=True))


def test_resume_refuses_different_data(tmp_path):
    train(tiny_bert(), token_dataset(), quiet(max_steps=2, checkpoint_every=2, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="trained on 40 examples, now train_data has 30"):
        train(tiny_bert(), token_dataset(count=30),
              quiet(max_steps=4, checkpoint_every=2, output_dir=str(tmp_path), resume=True))


def test_model_without_loss_gets_an_actionable_error():
    data = [{"input_ids": torch.tensor([1, 2, 3])}] * 4
    with pytest.raises(ValueError, match="labels"):
        train(tiny_bert(), TokenizedDataset(data, pad_collate), quiet(max_steps=1))


def test_hugging_face_trainer_accepts_the_datasets_and_collator(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    before = trainable_state(model)
    data = token_dataset()
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                  report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=arguments, train_dataset=data, data_collator=data.collate_fn).train()
    after = trainable_state(model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


class ModelWithMethodHooks(PoisonableRegression):
    """Offers the hooks a DeltaModel exposes for methods: an extra loss term and a per-step hook."""

    def __init__(self):
        super().__init__()
        self.hook_steps = []

    def auxiliary_loss(self):
        return 100.0 * self.linear.bias.pow(2).sum()

    def after_optimizer_step(self, step):
        self.hook_steps.append((step, self.linear.weight.grad is not None))


def test_loop_calls_model_hooks_for_methods():
    plain, hooked = PoisonableRegression(), ModelWithMethodHooks()
    first = train(plain, regression_data(), quiet(max_steps=3, max_grad_norm=None))
    second = train(hooked, regression_data(), quiet(max_steps=3, max_grad_norm=None))
    assert hooked.hook_steps == [(1, True), (2, True), (3, True)]
    assert second.losses[0] > first.losses[0]  # the penalty is part of the optimised loss
    assert abs(hooked.linear.bias.item()) < abs(plain.linear.bias.item())  # and it pulls the bias to 0


def test_report_to_writes_tensorboard_events_and_a_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_llama

    import deltatune as dt

    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))
    rows = [{"input_ids": torch.randint(0, 101, (8,)), "labels": torch.randint(0, 101, (8,))} for _ in range(8)]
    config = TrainConfig(max_steps=4, batch_size=4, log_every=2, progress=False, device="cpu",
                         report_to=["tensorboard", "csv"], logging_dir=str(tmp_path / "logs"))
    train(model, rows, config, eval_fn=lambda m: {"in_domain": {"loss": 1.5, "note": "text is skipped"}})
    lines = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,name,value" and "2,train/loss," in lines[1] and "4,eval/in_domain/loss,1.5" in lines
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/in_domain/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_report_to_refuses_an_unknown_target():
    with pytest.raises(ValueError, match="tensorboard, csv"):
        TrainConfig(report_to=["wandb"], output_dir="x")


def tiny_lora_run(tmp_path, callbacks=(), **options):
    from conftest import tiny_llama

    import deltatune as dt

    torch.manual_seed(0)
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))
    rows = [{"input_ids": torch.randint(0, 101, (8,), generator=torch.Generator().manual_seed(i))} for i in range(8)]
    rows = [{**row, "labels": row["input_ids"]} for row in rows]
    values = dict(max_steps=4, batch_size=4, checkpoint_every=1, progress=False, device="cpu", output_dir=str(tmp_path / "ckpt"))
    return model, train(model, rows, TrainConfig(**{**values, **options}), step_callbacks=callbacks)


def test_only_the_newest_checkpoints_are_kept_and_a_damaged_newest_one_falls_back(tmp_path, caplog):
    tiny_lora_run(tmp_path)
    folders = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("checkpoint-"))
    assert folders == ["checkpoint-00000003", "checkpoint-00000004"]
    damaged = tmp_path / "ckpt" / "checkpoint-00000004" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    _, result = tiny_lora_run(tmp_path, resume=True, max_steps=5)
    assert str(damaged) in caplog.text and result.steps == 5  # resumed from step 3, with a warning naming the file


def test_resume_refuses_changed_hyperparameters_unless_overridden_and_then_uses_and_records_them(tmp_path):
    from deltatune.train.checkpoint import read_checkpoint

    tiny_lora_run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"changed hyper-parameters \(lr 0.0005 -> 0.01"):
        tiny_lora_run(tmp_path, resume=True, max_steps=2, lr=1e-2)
    rates = []
    tiny_lora_run(tmp_path, resume=True, max_steps=3, lr=1e-2, resume_override=True, warmup_ratio=0.0,
                  callbacks=[lambda step, model, optimizer: rates.append(optimizer.param_groups[0]["initial_lr"])])
    assert rates == [1e-2]  # the new rate drives the optimizer, not only the record
    state = read_checkpoint(tmp_path / "ckpt" / "checkpoint-00000003")["state.json"]["trainer"]
    assert state["config"]["lr"] == 1e-2 and state["overrides"][0]["lr"] == {"was": 5e-4, "now": 1e-2}


@pytest.mark.parametrize("options, message", [
    ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"progress": "false"}, "progress must be bool"),
    ({"max_steps": "10"}, "max_steps must be int"),
])
def test_bad_training_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)
