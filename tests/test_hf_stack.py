"""The wrapped model in the Hugging Face training stack: Trainer with default arguments, autocast."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama

import deltatune as dt


def lm_rows(count: int = 16, length: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, 101, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def test_forward_shows_the_base_models_arguments_to_introspection():
    from transformers.utils.generic import find_labels

    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    parameters = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(parameters)
    assert find_labels(type(model)) == ["labels"]  # what Trainer uses for eval_loss
    assert isinstance(model, dt.DeltaModel)
    classifier = dt.wrap(tiny_bert_classifier(), dt.LoraConfig(r=4))
    assert "token_type_ids" in inspect.signature(classifier.forward).parameters


def trainer_run(output_dir, resume_from=None, init_seed=0):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(init_seed)  # LoRA's A starts random
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.1))
    args = TrainingArguments(str(output_dir), max_steps=4, gradient_checkpointing=True, save_steps=2,
                             per_device_train_batch_size=4)
    rows = lm_rows()
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


def test_trainer_with_default_arguments_trains_evaluates_and_resumes_from_adapter_checkpoints(tmp_path):
    from safetensors.torch import load_file

    model, trainer = trainer_run(tmp_path / "out")
    fresh = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    assert any(not torch.equal(p, q.cpu()) for p, q in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    # The checkpoint holds the adapter (what the wrapper's state_dict is), not the frozen base.
    checkpoint = tmp_path / "out" / "checkpoint-2" / "model.safetensors"
    saved = load_file(checkpoint)
    assert set(saved) == {f"model.{n}" for n, p in model.model.named_parameters() if p.requires_grad}
    full_bytes = sum(t.numel() * t.element_size() for t in model.model.state_dict().values())
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert checkpoint.stat().st_size < adapter_bytes + 16_384 and adapter_bytes < 0.2 * full_bytes
    # Resuming from step 2 ends on exactly the adapter of the uninterrupted run (dropout included),
    # although the resumed model was initialised differently: the checkpoint is what counts.
    resumed, _ = trainer_run(tmp_path / "again", resume_from=str(tmp_path / "out" / "checkpoint-2"), init_seed=1)
    ours, theirs = model.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours)


def test_state_dict_is_the_delta_and_loads_strictly_into_a_fresh_wrapper():
    model = dt.wrap(tiny_bert_classifier(), dt.LoraConfig(r=2, init_lora_weights=False, task_type="SEQ_CLS"))
    model.add_adapter("bias", dt.BitFitConfig())
    state = model.state_dict()
    assert state and all(".lora_" in k or ".modules_to_save." in k or "bitfit" in k.lower() or "bias" in k for k in state)
    assert not any(k.endswith("base_layer.weight") for k in state)
    other = dt.wrap(tiny_bert_classifier(seed=5), dt.LoraConfig(r=2, task_type="SEQ_CLS"))
    other.add_adapter("bias", dt.BitFitConfig())
    other.load_state_dict(state)  # strict: every delta key present, the base's need not be
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    with pytest.raises(RuntimeError, match="missing"):
        other.load_state_dict({k: v for k, v in list(state.items())[1:]})


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["lora", "ia3", "adapter", "prefix", "qlora"])
@pytest.mark.parametrize("precision", ["bf16-autocast", "fp16-autocast", "bf16-weights"])
def test_methods_train_under_cpu_autocast_and_on_bf16_weights(build, method, precision):
    base = build().to(torch.bfloat16) if precision == "bf16-weights" else build()
    model = dt.wrap(base, dt.make_config(method))
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
    with torch.autocast("cpu", dtype=dtype) if dtype else torch.enable_grad():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_train_loop_with_bf16_mixed_precision_on_the_cpu():
    from deltatune.train import TrainConfig, train

    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    rows = [{k: torch.tensor(v) for k, v in row.items()} for row in lm_rows(8)]
    result = train(model, rows, TrainConfig(max_steps=3, batch_size=4, mixed_precision="bf16", device="cpu", progress=False))
    assert all(math.isfinite(loss) for loss in result.losses)


def test_save_pretrained_writes_adapters_only_in_peft_layout_and_from_pretrained_reads_them(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("other", dt.IA3Config(init_ia3_weights=False))
    model.save_pretrained(tmp_path / "out", safe_serialization=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]
    assert (tmp_path / "out" / "other" / "adapter_model.safetensors").is_file()
    tokens = torch.randint(0, 101, (2, 8))
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_peft_named_aliases():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, init_lora_weights=False))
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (model.trainable_parameters().trainable, model.trainable_parameters().total)
    assert model.peft_config is model.configs and model.active_adapter == "default"
    assert model.get_base_model() is model.model
    tokens = torch.randint(0, 101, (1, 6))
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=tokens).logits
    with torch.no_grad():
        assert torch.equal(plain, tiny_llama()(input_ids=tokens).logits)


def word_tokenizer():
    """A word-level tokenizer over tiny_llama's 101 ids, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(4, 101)}
    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **words}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def test_trl_sft_trainer_trains_a_wrapped_model_with_its_default_config(tmp_path):
    """SFTConfig's defaults turn on bf16 autocast and gradient checkpointing; on a machine without a
    GPU transformers itself asks for use_cpu=True."""
    import random

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(4, 101)}" for _ in range(10)) for _ in range(16)]
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = SFTConfig(str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, use_cpu=not torch.cuda.is_available())
    assert config.bf16 and config.gradient_checkpointing  # the defaults that used to stop it
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}), processing_class=word_tokenizer())
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before and ".lora_B." in n)


def test_adapter_folders_get_a_model_card(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8))
    model.save(tmp_path / "a", task="sentiment", metrics={"accuracy": 0.75})
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: deltatune")
    for expected in ("| method | lora (peft_type LORA) |", "14 modules", "r=4", "lora_alpha=8",
                     f"| trainable parameters | {model.trainable_parameters().trainable:,}", "| task | sentiment |",
                     "| accuracy | 0.75 |"):
        assert expected in card, expected
    assert dt.load(tiny_llama(), tmp_path / "a").adapter_names == ["default"]  # the card changes no loading


def test_a_wrapped_model_pickles_and_deep_copies_with_its_adapters():
    import copy
    import io
    import pickle

    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, init_lora_weights=False))
    ids = torch.randint(0, 101, (1, 5))
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a whole-model save, as some tools do
    buffer.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(clone) is type(model) and clone.adapter_names == ["default"]
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
