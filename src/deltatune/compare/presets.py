"""Named settings the comparison job and the estimator use, kept in one visible place.

* RUN_PRESETS: how long `deltatune compare` trains and evaluates (quick / default).
* FALLBACK_LEARNING_RATES: the learning rate of each method when its registration
  (`method_info(name).compare_defaults["lr"]`) gives none. PEFT methods train few parameters
  from a small start and need roughly 10x the learning rate of full fine-tuning.
* MODEL_PRESETS: architecture shapes `deltatune estimate` accepts by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

FULL = "full"  # full fine-tuning: the comparison's own baseline, not a registered method


@dataclass(frozen=True)
class RunPreset:
    """How much work one comparison does. Every method gets the same steps, batch and seed."""

    name: str
    max_steps: int
    batch_size: int
    train_limit: int | None  # training examples read (None: all)
    eval_limit: int | None  # examples per evaluation split (None: all)
    methods: tuple[str, ...]  # those not registered (yet) are skipped
    description: str


RUN_PRESETS: dict[str, RunPreset] = {
    "quick": RunPreset(
        name="quick",
        max_steps=60,
        batch_size=32,
        train_limit=1920,
        eval_limit=400,
        methods=(FULL, "lora", "bitfit"),
        description="about 3 minutes on 2 CPU cores: 60 steps, 3 methods, 400 examples per eval split",
    ),
    "default": RunPreset(
        name="default",
        max_steps=188,
        batch_size=32,
        train_limit=None,
        eval_limit=None,
        # One method of each main kind (reparameterized, selective, additive) beside full
        # fine-tuning: 10 minutes measured on 2 CPU cores (each method trains about 2 minutes).
        # `--methods all` runs every registered method (about 45 minutes there).
        methods=(FULL, "lora", "bitfit", "adapter"),
        description="one epoch of 6,000 examples, 4 methods; about 10 minutes on 2 CPU cores",
    ),
}
ALL_METHODS = "all"  # in a method list: full fine-tuning and every registered method

# Used only when a method's registration has no "lr" in its compare_defaults.
FALLBACK_LEARNING_RATES: dict[str, float] = {
    FULL: 5e-5,
    "lora": 1e-3,
    "bitfit": 5e-3,
    "layernorm": 5e-3,
    "ia3": 5e-3,
    "adapter": 1e-3,
    "fisher": 2e-4,
    "prompt": 1e-2,
    "qlora": 1e-3,
}
DEFAULT_PEFT_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class ModelPreset:
    """An architecture shape for `estimate`, built from its config alone (no weights)."""

    name: str
    task_kind: str  # "classification" | "causal_lm"
    description: str
    make_config: Callable[[], Any] = field(repr=False)


def _llama(**shape: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(**shape)

    return make


def _bert(**shape: Any) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import BertConfig

        return BertConfig(**shape)

    return make


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config()


MODEL_PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in [
        ModelPreset(
            "llama-7b",
            "causal_lm",
            "Llama-2 7B shape: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000",
            _llama(
                hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
            ),
        ),
        ModelPreset(
            "llama-70b",
            "causal_lm",
            "Llama-2 70B shape: 80 layers, hidden 8192, MLP 28672, 64 heads / 8 KV heads, vocab 32000",
            _llama(
                hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
            ),
        ),
        ModelPreset(
            "llama3-8b",
            "causal_lm",
            "Llama-3 8B shape: 32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256",
            _llama(
                hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
            ),
        ),
        ModelPreset(
            "llama-1b",
            "causal_lm",
            "Llama-3.2 1B shape: 16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, tied embeddings",
            _llama(
                hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                tie_word_embeddings=True, rope_theta=500000.0,
            ),
        ),
        ModelPreset(
            "smollm2-135m",
            "causal_lm",
            "SmolLM2-135M shape: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, tied embeddings",
            _llama(
                hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                tie_word_embeddings=True, rope_theta=100000.0,
            ),
        ),
        ModelPreset(
            "minilm",
            "classification",
            "MiniLM-L6-H384 (the default task's encoder): 6 layers, hidden 384, MLP 1536, 12 heads",
            _bert(
                hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                vocab_size=30522, max_position_embeddings=512,
            ),
        ),
        ModelPreset(
            "bert-base",
            "classification",
            "BERT-base shape: 12 layers, hidden 768, MLP 3072, 12 heads",
            _bert(),
        ),
        ModelPreset("gpt2", "causal_lm", "GPT-2 small shape: 12 layers, hidden 768, 12 heads", _gpt2),
    ]
}
