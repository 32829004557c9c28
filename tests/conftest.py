"""Tiny models built from configs (no downloads), shared by the test files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


def tiny_llama(layers: int = 2, hidden: int = 32, vocab: int = 101, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 2, hidden: int = 32, vocab: int = 101, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(layers: int = 2, hidden: int = 32, labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
        vocab_size=101, max_position_embeddings=64, num_labels=labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=101, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_channels=3, num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter that does not require grad (to check the base stays untouched)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def train_steps(model: nn.Module, loss_fn, steps: int = 3, lr: float = 1e-2, train_mode: bool = False) -> list[float]:
    """A few AdamW steps on the parameters that require grad; returns the losses.

    train_mode=True runs them in training mode (dropout on) and restores the previous mode after.
    """
    was_training = model.training
    if train_mode:
        model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.train(was_training)
    return losses


def token_batch(vocab: int = 101, batch: int = 4, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def randomize_adapters(model, seed: int = 3, scale: float = 0.1) -> None:
    """Give every adapter tensor non-trivial values so merge/save tests cannot pass by zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device) * scale)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    return token_batch()


CAUSAL_LM_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


def tiny_causal_lm(family: str, tied: bool = False):
    """A 2-layer model of each family the compatibility table marks as having a plain head."""
    import transformers

    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),  # shorter than test sequences
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
        # Softcapped logits (and attention), GeGLU, extra norms: the loss must apply the cap.
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 5.0,
                                                        "query_pre_attn_scalar": 16}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),  # fused qkv_proj / gate_up_proj
        # Sliding-window layers (a window shorter than the test sequences), q/k norms, softcapped logits.
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                             "sliding_window": 4, "final_logit_softcapping": 5.0}),
    }
    config_name, model_name, extra = configs[family]
    config = getattr(transformers, config_name)(**shape, **extra)
    config._attn_implementation = "eager"
    return getattr(transformers, model_name)(config)
