"""Adapters move both ways between deltatune and Hugging Face peft, with the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

import deltatune as dt

peft = pytest.importorskip("peft")

CASES = [
    (tiny_llama, {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    (tiny_llama, {"target_modules": ["q_proj", "o_proj"], "use_dora": True}),
    (tiny_llama, {"target_modules": ["k_proj", "up_proj"], "use_rslora": True, "rank_pattern": {"up_proj": 2}}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"]}),
]


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("build, fields", CASES)
def test_deltatune_adapter_loads_in_peft_with_same_logits(build, fields, tmp_path):
    tokens = token_ids = token_batch()
    ours = dt.wrap(build(), dt.LoraConfig(r=4, lora_alpha=8, **fields))
    randomize_adapters(ours)
    ours.save(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    assert relative_error(_logits(theirs, token_ids), _logits(ours, tokens)) < 1e-5


@pytest.mark.parametrize("build, fields", CASES)
def test_peft_adapter_loads_in_deltatune_with_same_logits(build, fields, tmp_path):
    tokens = token_batch()
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, **fields))
    randomize_adapters(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = dt.load(build(), tmp_path / "p")
    assert relative_error(_logits(ours, tokens), _logits(theirs, tokens)) < 1e-5


def test_classifier_head_in_modules_to_save_round_trips_with_peft(tmp_path):
    tokens = token_batch()
    ours = dt.wrap(tiny_bert_classifier(), dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapters(ours)
    ours.save(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), str(tmp_path / "a"))
    assert relative_error(_logits(theirs, tokens), _logits(ours, tokens)) < 1e-5
    theirs.save_pretrained(str(tmp_path / "p"))
    back = dt.load(tiny_bert_classifier(), tmp_path / "p")
    assert relative_error(_logits(back, tokens), _logits(ours, tokens)) < 1e-5


def test_peft_feature_we_do_not_implement_is_refused_not_ignored(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    theirs.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(dt.ConfigError, match="lora_bias"):
        dt.load(tiny_llama(), tmp_path / "p")


@pytest.mark.parametrize("build, task_type", [(tiny_llama, None), (tiny_gpt2, None), (tiny_bert_classifier, "SEQ_CLS")])
def test_default_target_adapter_loads_in_peft_with_same_logits(build, task_type, tmp_path):
    """With no target_modules the file lists the modules trained, since peft's own default differs;
    with task_type SEQ_CLS the new head trains and is saved, as in peft."""
    tokens = token_batch()
    ours = dt.wrap(build(), dt.LoraConfig(r=4, lora_alpha=8, task_type=task_type))
    if task_type == "SEQ_CLS":
        head = [n for n, p in ours.named_parameters() if p.requires_grad and n.startswith("model.classifier.")]
        assert head == ["model.classifier.modules_to_save.default.weight", "model.classifier.modules_to_save.default.bias"]
        assert ours.configs["default"].modules_to_save == ["classifier"]
    randomize_adapters(ours)
    ours.save(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    assert relative_error(_logits(theirs, tokens), _logits(ours, tokens)) < 1e-5


def test_default_target_ia3_adapter_loads_in_peft_with_same_logits(tmp_path):
    tokens = token_batch()
    ours = dt.wrap(tiny_llama(), dt.IA3Config(init_ia3_weights=False))
    ours.save(tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    assert relative_error(_logits(theirs, tokens), _logits(ours, tokens)) < 1e-5
