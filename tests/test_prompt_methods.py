"""Soft prompts: prompt tuning, P-tuning and prefix tuning on Llama (GQA), GPT-2 and BERT shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    frozen_snapshot, randomize_adapters, relative_error, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch,
    train_steps,
)
from torch import nn

import deltatune as dt
from deltatune.methods.prompt import PrefixAttention, VirtualTokens

METHODS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="sample_vocab"),
    "ptuning": lambda: dt.PTuningConfig(num_virtual_tokens=8, encoder_hidden_size=32),
    "ptuning_lstm": lambda: dt.PTuningConfig(
        num_virtual_tokens=8, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=8),
    "prefix_projection": lambda: dt.PrefixTuningConfig(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=32),
}
LEARNING_RATES = {"prompt": 3e-2, "ptuning": 1e-2, "prefix": 3e-2, "prefix_projection": 3e-3}
CAUSAL_LMS = [tiny_llama, tiny_gpt2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def steerable(model: nn.Module) -> nn.Module:
    """Larger weights, like a trained model's: at init scale (std 0.02) attention is too weak
    for a few virtual tokens to steer the output, so no soft prompt could learn anything."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.25, generator=generator)
    return model




def greedy(model, ids, mask=None, use_cache=True, new=6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


# -- learning -----------------------------------------------------------------------------------
LEARNING_CASES = [
    (build, method) for build in (tiny_llama, tiny_gpt2, tiny_bert_classifier) for method in ("prompt", "ptuning", "prefix")
]


# The projection is architecture-independent: one model shows it.
@pytest.mark.parametrize("build, method", [*LEARNING_CASES, (tiny_llama, "prefix_projection")])
def test_learns_a_toy_task_with_only_the_adapter_trained(build, method):
    model = dt.wrap(steerable(build()), METHODS[method]())
    before = frozen_snapshot(model)
    tokens = token_batch(length=8)
    # Steer every output to one answer: token 42 for the LMs, class 1 for the classifier.
    labels = torch.ones(4, dtype=torch.long) if build is tiny_bert_classifier else torch.full_like(tokens, 42)
    losses = train_steps(
        model, lambda m: m(input_ids=tokens, labels=labels).loss, steps=30, lr=LEARNING_RATES[method], train_mode=True
    )
    assert losses[-1] < 0.5 * losses[0], losses
    adapter = {id(p) for p in model._adapter_params("default")}
    assert all(id(p) in adapter for p in model.parameters() if p.requires_grad)
    after = frozen_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_classifier_pools_cls_at_position_0_and_trains_beside_its_head():
    base = tiny_bert_classifier()
    model = dt.wrap(base, dt.PromptTuningConfig(num_virtual_tokens=5, modules_to_save=["classifier"]))
    seen = {}
    handle = base.bert.embeddings.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    tokens = token_batch(length=6)
    logits = model(input_ids=tokens).logits
    handle.remove()
    embeds, word_embeddings = seen["inputs_embeds"], base.bert.embeddings.word_embeddings.get_base_layer()
    assert embeds.shape[1] == 6 + 5 and logits.shape == (4, 3)
    assert torch.equal(embeds[:, 0], word_embeddings(tokens[:, 0]))  # [CLS] stays first
    assert torch.equal(embeds[:, 1:6], model.model.bert.embeddings.word_embeddings.virtual_tokens("default").expand(4, -1, -1))
    assert torch.equal(embeds[:, 6:], word_embeddings(tokens[:, 1:]))
    head = sum(p.numel() for p in base.classifier.modules_to_save["default"].parameters())
    assert model.trainable_parameters().trainable == 5 * 32 + head


# -- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
@pytest.mark.parametrize("build", CAUSAL_LMS)
def test_generate_differs_from_base_is_deterministic_and_handles_cache_and_padding(build, method):
    model = dt.wrap(steerable(build()), METHODS[method]())
    randomize_adapters(model, scale=0.5)
    model.eval()
    ids = token_batch(batch=2, length=5)
    with torch.no_grad():
        out = greedy(model, ids)
        assert torch.equal(out, greedy(model, ids))  # greedy decoding is deterministic
        assert torch.equal(out, greedy(model, ids, use_cache=False))  # the cached path keeps positions right
        with model.disable_adapters():
            assert not torch.equal(out, greedy(model, ids))
        # A left-padded batch generates what each row does alone.
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :3]], dim=1)
        mask = torch.tensor([[0, 0, 1, 1, 1]])
        batch = greedy(model, torch.cat([ids[:1], padded]), torch.cat([torch.ones(1, 5, dtype=torch.long), mask]))
        assert torch.equal(batch[0], out[0])
        assert torch.equal(batch[1, 2:], greedy(model, ids[1:, :3])[0])


@pytest.mark.parametrize("build", CAUSAL_LMS)
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_beam_search_and_sampling_agree_with_and_without_the_cache(build, method):
    model = dt.wrap(steerable(build()), METHODS[method]())
    randomize_adapters(model, scale=0.5)
    model.eval()
    ids = token_batch(batch=2, length=5)

    def run(use_cache, **options):
        torch.manual_seed(5)  # sampling draws the same numbers in both runs
        return model.generate(input_ids=ids, max_new_tokens=5, use_cache=use_cache, pad_token_id=0, **options)

    with torch.no_grad():
        for options in ({"num_beams": 3, "do_sample": False}, {"do_sample": True, "top_k": 5}):
            cached = run(True, **options)
            assert torch.equal(cached, run(False, **options)), options
            with model.disable_adapters():
                assert not torch.equal(cached, run(True, **options)), options


# -- parameter counts, files, outputs ------------------------------------------------------------
def test_trainable_parameters_equal_the_hand_count(tmp_path):
    hidden, layers, n = 32, 2, 8
    kv_width = 2 * (hidden // 4)  # tiny_llama: 2 key/value heads of 8 (grouped-query attention)
    counts = {
        "prompt": n * hidden,
        "ptuning": n * hidden + (hidden * 32 + 32) + (32 * 32 + 32) + (32 * hidden + hidden),  # seeds + 3-layer MLP
        "prefix": 2 * layers * n * kv_width,
    }
    for method, expected in counts.items():
        model = dt.wrap(tiny_llama(), METHODS[method]())
        assert model.trainable_parameters().trainable == expected, method
    gpt2 = dt.wrap(tiny_gpt2(), METHODS["prefix"]())
    assert gpt2.trainable_parameters().trainable == 2 * layers * n * hidden  # GPT-2: key/value width = hidden
    # Reparameterised tables are saved folded, as the tokens (prefixes) they produce.
    for method, folded in (("ptuning", n * hidden), ("prefix_projection", 2 * layers * n * kv_width)):
        path = dt.wrap(tiny_llama(), METHODS[method]()).save(tmp_path / method)
        loaded = dt.load(tiny_llama(), path)
        state = loaded.adapter_state_dict()
        assert list(state) == ["base_model.model.model.embed_tokens.prompt_embeddings"]
        assert state[next(iter(state))].numel() == folded
        assert sum(p.numel() for p in loaded._adapter_params("default")) == folded


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_gives_identical_outputs(method, tmp_path):
    model = dt.wrap(steerable(tiny_llama()), METHODS[method]())
    randomize_adapters(model, scale=0.5)
    model.eval()
    tokens = token_batch()
    with torch.no_grad():
        out = model(input_ids=tokens).logits
        path = model.save(tmp_path / "adapter")
        assert relative_error(model(input_ids=tokens).logits, out) < 1e-6  # folding changed nothing
        loaded = dt.load(steerable(tiny_llama()), path)
        assert relative_error(loaded(input_ids=tokens).logits, out) < 1e-6
        # Loaded for more training, the encoder comes back and starts from the saved tokens.
        trainable = dt.load(steerable(tiny_llama()), path, is_trainable=True)
        assert relative_error(trainable(input_ids=tokens).logits, out) < 1e-5
    fresh = dt.wrap(tiny_llama(), METHODS[method]())
    assert trainable.trainable_parameters().trainable == fresh.trainable_parameters().trainable


def test_logits_keep_the_callers_length_and_loss_skips_virtual_tokens():
    model = dt.wrap(tiny_llama(), METHODS["prompt"]())
    tokens = token_batch()
    labels = tokens.clone()
    labels[:, :3] = -100
    out = model(input_ids=tokens, labels=labels)
    assert out.logits.shape == (4, 12, 101)
    expected = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_init_from_text_uses_the_texts_token_embeddings():
    tokenizer = word_tokenizer()
    model = dt.wrap(tiny_llama(), dt.PromptTuningConfig(
        num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_text="classify the sentiment"), tokenizer=tokenizer)
    table = model.model.model.embed_tokens.prompt_embeddings["default"]
    ids = torch.tensor([5, 6, 7, 5, 6])  # the text's ids, repeated to fill 5 tokens
    assert torch.equal(table, model.model.model.embed_tokens.weight[ids])


def test_disable_and_delete_restore_the_base_and_remove_the_hooks():
    base = steerable(tiny_llama())
    tokens = token_batch()
    with torch.no_grad():
        reference = base(input_ids=tokens).logits
        model = dt.wrap(base, METHODS["prefix"]())
        randomize_adapters(model, scale=0.5)
        assert not torch.allclose(model(input_ids=tokens).logits, reference)
        with model.disable_adapters():
            assert torch.equal(model(input_ids=tokens).logits, reference)
        model.delete_adapter("default")
        assert not base._forward_pre_hooks and not base._forward_hooks
        assert type(base.model.embed_tokens) is nn.Embedding
        assert torch.equal(model(input_ids=tokens).logits, reference)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert_classifier])
def test_works_on_a_meta_device_model_as_the_estimator_builds_it(build):
    for method in METHODS:
        model = dt.wrap(build().to("meta"), METHODS[method]())
        out = model(input_ids=torch.zeros(2, 6, dtype=torch.long, device="meta"))
        assert out.logits.shape[0] == 2 and out.logits.is_meta, method


def test_compare_defaults_build_on_a_classifier_and_a_causal_lm():
    for method in ("prompt", "ptuning", "prefix"):
        fields = {k: v for k, v in dt.method_info(method).compare_defaults.items() if k != "lr"}
        classifier = dt.wrap(tiny_bert_classifier(), dt.make_config(method, modules_to_save=["classifier"], **fields))
        assert classifier(input_ids=token_batch(), labels=torch.tensor([0, 1, 2, 1])).loss.isfinite()
        assert dt.wrap(tiny_llama(), dt.make_config(method, **fields))(input_ids=token_batch()).logits.isfinite().all()


# -- models without a transformers cache: prefixes through nn.MultiheadAttention -------------------
class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, padding_mask=None):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=padding_mask).mean(1))


def test_prefix_tuning_on_torch_multihead_attention(tmp_path):
    steerable(base := TinyEncoder())
    ids = token_batch(vocab=50, length=6)
    reference = base.eval()(ids)
    model = dt.wrap(base, dt.PrefixTuningConfig(num_virtual_tokens=4))
    assert sum(isinstance(m, PrefixAttention) for m in model.modules()) == 2
    assert model.trainable_parameters().trainable == 2 * 2 * 4 * 32
    labels = torch.ones(4, dtype=torch.long)
    losses = train_steps(model, lambda m: nn.functional.cross_entropy(m(ids), labels), steps=30, lr=3e-2, train_mode=True)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        out = model(ids)  # eval mode: torch's fused fast path must not skip the prefixes
        assert not torch.allclose(out, reference)
        padding = torch.zeros(4, 6, dtype=torch.bool)
        padding[:, -1] = True
        assert model(ids, padding).isfinite().all()
        loaded = dt.load(steerable(TinyEncoder()).eval(), model.save(tmp_path / "a"))
        assert torch.allclose(loaded(ids), out, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "sentiment": 7, "of": 8, "this": 9, "review": 10}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_input_longer_than_the_context_is_a_clear_error():
    with pytest.raises(dt.ConfigError, match="fills the model's whole context of 128"):
        dt.wrap(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=128))
    model = dt.wrap(tiny_gpt2(), dt.PromptTuningConfig(num_virtual_tokens=20))
    with pytest.raises(ValueError, match=r"120 input tokens \+ 20 virtual tokens need 140 positions.*context of 128"):
        model(input_ids=token_batch(length=120))
    prefix = dt.wrap(tiny_gpt2(), dt.PrefixTuningConfig(num_virtual_tokens=20))
    prefix(input_ids=token_batch(length=120))  # prefixes take no positions
    with pytest.raises(ValueError, match="130 input tokens need 130 positions"):
        prefix(input_ids=token_batch(length=130))


def test_init_text_longer_than_the_virtual_tokens_is_a_clear_error():
    config = dt.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="text",
                                   prompt_tuning_init_text="classify the sentiment of this review")
    with pytest.raises(dt.ConfigError, match="tokenizes to 6 tokens, more than num_virtual_tokens=3"):
        dt.wrap(tiny_llama(), config, tokenizer=word_tokenizer())
    with pytest.raises(dt.ConfigError, match="needs a tokenizer"):
        dt.wrap(tiny_llama(), config)
    with pytest.raises(dt.ConfigError, match="needs prompt_tuning_init_text"):
        dt.PromptTuningConfig(prompt_tuning_init="text")


def test_other_misuse_is_a_clear_error():
    with pytest.raises(dt.ConfigError, match="target_modules.*do not apply"):
        dt.PrefixTuningConfig(target_modules=["q_proj"])
    with pytest.raises(dt.ConfigError, match="hidden size is 32"):
        dt.wrap(tiny_llama(), dt.PromptTuningConfig(token_dim=64))
    model = dt.wrap(tiny_llama(), METHODS["prompt"](), adapter_name="a")
    dt.wrap(model, METHODS["prefix"](), adapter_name="b")
    with pytest.raises(RuntimeError, match="Several soft-prompt adapters are active"):
        model(input_ids=token_batch())
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge()
    checkpointed = dt.wrap(tiny_llama(), METHODS["prefix"]())
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()
    with pytest.raises(RuntimeError, match="drops under gradient checkpointing"):
        checkpointed(input_ids=token_batch())
    assert isinstance(model.model.model.embed_tokens, VirtualTokens)
