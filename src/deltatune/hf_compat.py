"""Everything deltatune knows about transformers' internal names, in one place.

transformers renames things between releases (5.24 renamed the forward argument and output field
`past_key_values` to `cache`; 5.x renamed `gradient_checkpointing_enable` to
`activation_checkpointing_enable`; ViT's projections were renamed in 5.0). Every other module asks
this one instead of spelling such names itself, so an upstream rename is fixed here once.

It also holds the architecture table: for each family of model types, the default targets of
each method kind and the classes the fused training path may replace. Adding an architecture is
adding one `Architecture` entry to `ARCHITECTURES`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator

from torch import nn


def transformers_version() -> str:
    """The installed transformers release, e.g. "5.24.0"."""
    import transformers

    return transformers.__version__


# -- the architecture table -----------------------------------------------------------------------


@dataclass(frozen=True)
class FusedBlock:
    """Classes of one model type that the fused training path may replace (kernels/patch.py).

    Each must compute exactly the code the fused functions reproduce: RMSNorm with float32
    statistics (Llama's `w * normed.to(dtype)`, or with `norm_unit_offset` Gemma's
    `(normed * (1 + w)).to(dtype)`), a gated MLP with gate/up/down projections whose `act_fn` is
    one `gated_activation` names (or Phi-3's: one gate_up_proj, gate first, and `activation_fn`), and `apply_rotary_pos_emb(q, k, cos, sin)` called from the
    attention's forward."""

    modeling_module: str  # e.g. "transformers.models.llama.modeling_llama"
    norm_class: str
    mlp_class: str
    attention_class: str
    norm_unit_offset: bool = False  # Gemma: weights are offsets from one, the scale applies in float32


@dataclass(frozen=True)
class Architecture:
    """Module-name conventions of one architecture family (names match as dotted suffixes,
    `*_patterns` as regex fragments matched at a dot boundary)."""

    family: str
    model_types: tuple[str, ...]
    linear_targets: tuple[str, ...]  # LoRA-style methods: the attention and MLP projections (() = all linear)
    key_value_patterns: tuple[str, ...] = ()  # IA3: projections producing keys and values
    attention_output_patterns: tuple[str, ...] = ()  # bottleneck adapters (Houlsby)
    ffn_output_patterns: tuple[str, ...] = ()  # bottleneck adapters, IA3's feed-forward scaling
    ffn_block_patterns: tuple[str, ...] = ()  # parallel adapters: the whole feed-forward block
    encoder_only: bool = False  # bidirectional (BERT-style): pools position 0, no label shift
    plain_lm_head: bool = False  # the causal-LM head is a plain projection of the last hidden state
    # Sibling modules the model calls on the same input tensor, one after the other (mixed-batch
    # decoding shares their LoRA shrink; it checks that the tensor is the same, so a wrong entry
    # costs speed, never correctness).
    shared_input_groups: tuple[tuple[str, ...], ...] = ()
    fused: dict[str, FusedBlock] | None = None  # model type -> classes the fused path may replace


# Phi-3 computes q, k, v in one qkv_proj and gate, up in one gate_up_proj: the same seven projections.
_LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
_LLAMA_ROLES = dict(
    key_value_patterns=(r"k_proj", r"v_proj"),
    attention_output_patterns=(r"self_attn\.o_proj",),
    ffn_output_patterns=(r"mlp\.down_proj",),
    ffn_block_patterns=(r"mlp",),
)
_BERT_LINEAR = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
_BERT_FFN_OUT = r"layer\.\d+\.output\.dense"  # the block's output.dense, not attention.output.dense


def _llama_like(model_type: str, prefix: str, module: str | None = None, **options: Any) -> FusedBlock:
    module = module or model_type
    return FusedBlock(f"transformers.models.{module}.modeling_{module}",
                      f"{prefix}RMSNorm", f"{prefix}MLP", f"{prefix}Attention", **options)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "llama", ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "smollm3"),
        _LLAMA_LINEAR, **_LLAMA_ROLES, plain_lm_head=True,
        shared_input_groups=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
        # Those whose norm, gated MLP and rotary code the fused functions reproduce exactly
        # (tests/test_kernels.py, per family); Phi-3's MLP splits its gate_up_proj. The MoE blocks are not.
        fused={
            "llama": _llama_like("llama", "Llama"), "mistral": _llama_like("mistral", "Mistral"),
            "qwen2": _llama_like("qwen2", "Qwen2"), "qwen3": _llama_like("qwen3", "Qwen3"),
            "gemma": _llama_like("gemma", "Gemma", norm_unit_offset=True),
            "gemma2": _llama_like("gemma2", "Gemma2", norm_unit_offset=True),
            "gemma3_text": _llama_like("gemma3_text", "Gemma3", "gemma3", norm_unit_offset=True),
            "phi3": _llama_like("phi3", "Phi3"),
        },
    ),
    Architecture(
        "gpt2", ("gpt2",), ("c_attn", "c_proj", "c_fc"),
        key_value_patterns=(r"c_attn",),  # c_attn holds q, k and v: IA3 scales all three
        attention_output_patterns=(r"attn\.c_proj",), ffn_output_patterns=(r"mlp\.c_proj",), ffn_block_patterns=(r"mlp",),
    ),
    Architecture(
        "bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        _BERT_LINEAR, key_value_patterns=(r"key", r"value"), attention_output_patterns=(r"attention\.output\.dense",),
        ffn_output_patterns=(_BERT_FFN_OUT,), ffn_block_patterns=(r"layer\.\d+\.output",), encoder_only=True,
    ),
    # Other encoders: bidirectional (pooled at position 0), with module names of their own, so
    # LoRA-style methods default to every linear layer but the head.
    Architecture("encoder", ("distilbert", "albert", "deberta", "deberta-v2", "mpnet"), (), encoder_only=True),
    Architecture(
        # transformers < 5 names ViT like BERT; 5.x renamed the projections to q_proj ... fc2. Both are listed.
        "vit", ("vit", "deit"),
        (*_BERT_LINEAR, "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        key_value_patterns=(r"key", r"value", r"k_proj", r"v_proj"),
        attention_output_patterns=(r"attention\.o_proj", r"attention\.output\.dense"),
        ffn_output_patterns=(r"mlp\.fc2", _BERT_FFN_OUT), ffn_block_patterns=(r"mlp", r"layer\.\d+\.output"),
    ),
    Architecture(
        "t5", ("t5", "mt5", "umt5"), ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
        key_value_patterns=(r"k", r"v"), attention_output_patterns=(r"SelfAttention\.o", r"EncDecAttention\.o"),
        ffn_output_patterns=(r"DenseReluDense\.wo",), ffn_block_patterns=(r"DenseReluDense",),
    ),
)
_BY_MODEL_TYPE: dict[str, Architecture] = {t: arch for arch in ARCHITECTURES for t in arch.model_types}
# Blocks are numbered children of one of these containers, e.g. `model.layers.3.self_attn`.
BLOCK_CONTAINERS = ("layers", "layer", "h", "block", "blocks", "encoder.layer", "decoder.layers")


def model_type(model_or_config: Any) -> str | None:
    """`config.model_type` of a model (or of a config), None when it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def architecture(model_or_config: Any) -> Architecture | None:
    """The table entry for a model's (or config's) model type, None for unknown architectures."""
    return _BY_MODEL_TYPE.get(model_type(model_or_config) or "")


def model_family(model_or_config: Any) -> str | None:
    arch = architecture(model_or_config)
    return arch.family if arch else None


def is_encoder_only(model_or_config: Any) -> bool:
    """A bidirectional encoder (BERT-style) rather than a decoder."""
    arch = architecture(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    return bool(arch and arch.encoder_only and not getattr(config, "is_decoder", False))


def role_patterns(model: nn.Module, role: str) -> tuple[str, ...] | None:
    """Regex fragments of one role (e.g. "ffn_output") in this model's architecture, None if unknown."""
    arch = architecture(model)
    return getattr(arch, f"{role}_patterns") if arch else None


def shared_input_siblings(model: nn.Module) -> list[tuple[str, ...]]:
    """Dotted names of sibling modules that `model` calls on the same input tensor (e.g. each
    block's q_proj, k_proj, v_proj), per the architecture table; those of a group that exist."""
    arch = architecture(model)
    if arch is None or not arch.shared_input_groups:
        return []
    found = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        for group in arch.shared_input_groups:
            present = tuple(prefix + name for name in group if name in parent._modules)
            if len(present) > 1:
                found.append(present)
    return found


def suffix_regex(fragments: Iterable[str]) -> str:
    """A regex matching module names that end (at a dot boundary) with one of the fragments."""
    return rf"(?:.*\.)?(?:{'|'.join(fragments)})"


def fused_block(model: nn.Module) -> FusedBlock | None:
    """The classes the fused training path may replace in this model, None if it has no such path."""
    arch, kind = architecture(model), model_type(model)
    return (arch.fused or {}).get(kind or "") if arch else None


def fused_classes(model: nn.Module) -> tuple[type, type, type] | None:
    """(norm, MLP, attention) classes of this model's modeling file that the fused path may replace."""
    block = fused_block(model)
    if block is None:
        return None
    try:
        modeling = importlib.import_module(block.modeling_module)
        return (getattr(modeling, block.norm_class), getattr(modeling, block.mlp_class),
                getattr(modeling, block.attention_class))
    except (ImportError, AttributeError):  # renamed upstream: the plain path still works
        return None


# The freshly initialised heads of transformers' task models, by peft's task_type: trained and
# saved beside the adapter (peft does the same).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


def task_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """The head modules of this task type that `model` has (top-level children, as peft finds them)."""
    names = TASK_HEADS.get((task_type or "").upper(), ())
    children = dict(model.named_children())
    return [name for name in names if name in children]


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts labels[t + 1] from position t (a causal LM: the first
    label of each row is never a target), as the auto class tables of transformers list them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return any(type(module).__name__ in names or any(c.__name__ in names for c in type(module).__mro__)
               for module in model.modules())


def has_plain_lm_head(model: nn.Module) -> bool:
    arch = architecture(model)
    return bool(arch and arch.plain_lm_head)


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma-2's `final_logit_softcapping` (logits -> cap * tanh(logits / cap)), None without one."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def loss_is_plain_cross_entropy(model: nn.Module) -> bool:
    """Whether the causal LM's training loss is the mean token cross-entropy alone: not with MoE
    router losses added (`output_router_logits`) nor logits rescaled (`logit_scale`,
    `logits_scaling`), which a loss computed outside the model would miss."""
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        return False
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling"))


# -- module kinds --------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return False
    return isinstance(module, Conv1D)


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored packed (deltatune.quant.QuantLinear): no writable
    `.weight`, only a dequantized copy on demand."""
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantized_weight"))


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D or a 4-bit QuantLinear."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def linear_out_features(module: nn.Module) -> int:
    """Output width of a Linear (weight (out, in)) or Conv1D (weight (in, out))."""
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: nn.LayerNorm/GroupNorm/RMSNorm or a transformers *Norm class
    (LlamaRMSNorm, T5LayerNorm, ...), which share no base class."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def is_silu(module: Any) -> bool:
    """nn.SiLU or transformers' own SiLU activation class."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def gated_activation(module: Any) -> str | None:
    """The fused kernels' name for an MLP's activation module: "silu", "gelu_tanh" (GELU's tanh
    approximation as torch computes it: nn.GELU("tanh"), transformers' GELUTanh / PytorchGELUTanh
    unless set to its Python formula, which rounds differently), else None."""
    if is_silu(module):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else None
    if type(module).__name__ in ("GELUTanh", "PytorchGELUTanh"):
        act = getattr(module, "act", None)
        if act is None or (isinstance(act, functools.partial) and act.keywords == {"approximate": "tanh"}):
            return "gelu_tanh"
    return None


# -- key/value cache -----------------------------------------------------------------------------
# transformers 5.24 renamed the forward argument and the output field; the old name is accepted
# (deprecated) until 5.40. Both are read; the model's own name is written.
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The name this model's forward takes its key/value cache under: the one its signature (or
    its base model's, for task heads that pass **kwargs through) declares."""
    return _cache_argument(type(model), type(getattr(model, "base_model", None)))


@functools.lru_cache(maxsize=None)
def _cache_argument(*classes: type) -> str:
    # Per class, once: prefix tuning asks on every forward.
    for cls in classes:
        for name in CACHE_NAMES:
            if name in _forward_parameters(cls):
                return name
    return "past_key_values"


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    """The argument names of cls.forward (none where it has no readable signature)."""
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        return frozenset()


def get_cache(inputs: Any) -> Any:
    """The cache in forward keyword arguments or in a model output, under either name."""
    declared = getattr(type(inputs), "__dataclass_fields__", None)  # a model output's own fields
    for name in CACHE_NAMES:
        if declared is not None and name not in declared:
            continue  # the old name of a renamed field only aliases it, with a deprecation warning
        value = inputs.get(name) if hasattr(inputs, "get") else None
        if value is not None:
            return value
    return None


def set_cache(kwargs: dict, model: nn.Module, cache: Any) -> None:
    """Pass `cache` to `model` under the name its forward takes (dropping the other spelling)."""
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    kwargs[cache_argument(model)] = cache


def causal_lm_output(loss: Any, decoder_output: Any) -> Any:
    """A causal LM's output object holding `loss` and no logits, with the decoder's cache, hidden
    states and attentions under the names this transformers version's output class declares."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    declared = set(getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}))
    extra = {"hidden_states": getattr(decoder_output, "hidden_states", None),
             "attentions": getattr(decoder_output, "attentions", None)}
    cache = get_cache(decoder_output)
    if cache is not None:
        extra[next(name for name in CACHE_NAMES if name in declared)] = cache
    return CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in extra.items() if k in declared})


def clear_output_cache(output: Any, cache: Any) -> None:
    """Remove `cache` from a model output (under whichever name the output has it).

    The key itself goes, not only its value: generate() treats a cache key that is present, even
    holding None, as a cache to carry (and beam search then tries to reorder it). A ModelOutput
    refuses `del`, so the key is removed through OrderedDict, whose subclass it is."""
    for name in CACHE_NAMES:
        if not hasattr(output, "get") or output.get(name) is not cache:
            continue
        if isinstance(output, OrderedDict):
            OrderedDict.__delitem__(output, name)
        else:
            del output[name]
        if name in getattr(output, "__dict__", {}):
            object.__setattr__(output, name, None)


def new_cache(config: Any) -> Any:
    """An empty DynamicCache for a model of this config."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def new_static_cache(config: Any, max_length: int) -> Any:
    """A StaticCache of `max_length` positions: fixed-address key/value buffers (allocated on the
    first forward) that a CUDA graph can replay into."""
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_length)


def static_decode_kwargs(model: nn.Module, cache: Any, cache_position: Any) -> dict:
    """The keyword arguments of a forward over a static cache beyond input ids, mask and positions.

    transformers < 5.24 is told where to write in the cache (`cache_position`); from 5.24 a static
    cache counts its own writes on the device and the argument is gone."""
    kwargs: dict = {"use_cache": True}
    set_cache(kwargs, model, cache)
    if any("cache_position" in _forward_parameters(cls) for cls in (type(model), type(getattr(model, "base_model", None)))):
        kwargs["cache_position"] = cache_position
    if "logits_to_keep" in _forward_parameters(type(model)):
        kwargs["logits_to_keep"] = 1  # only the last position's logits: no (batch, prompt, vocab) tensor
    return kwargs


def static_cache_has_sliding_layers(cache: Any) -> bool:
    """Whether some layer of a StaticCache keeps only a sliding window (a ring buffer whose columns
    are not the sequence's positions)."""
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ()))


def allocate_static_cache(cache: Any, batch: int, like: Any) -> None:
    """Allocate every layer of `cache` for `batch` rows with the heads, head size, dtype and
    device of the same layer in `like`, an allocated StaticCache of the same model."""
    keys = [layer_keys for layer_keys, _ in cache_key_values(like)]
    cache.early_initialization(batch, [k.shape[1] for k in keys], [k.shape[3] for k in keys], keys[0].dtype, keys[0].device)


def set_static_cache_length(cache: Any, length: int) -> None:
    """Make every layer of a StaticCache write its next token at column `length` (its layers
    count their own writes; moving or copying columns by hand must tell them)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def supports_static_cache(model: nn.Module) -> bool:
    """Whether the model runs over a StaticCache (transformers marks such models as compilable
    with their whole graph, which a static cache is what allows)."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def cache_length(cache: Any) -> int:
    """Tokens held by a cache (0 for None)."""
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def cache_key_values(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer, each (batch, kv_heads, length, head_dim)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


# -- activation (gradient) checkpointing -----------------------------------------------------------
def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None = None, **options: Any) -> None:
    """Turn on activation checkpointing of a transformers model under whichever name it has
    (`activation_checkpointing_enable` since 5.x, `gradient_checkpointing_enable` before);
    `options` (every_n_layers, offload) only where given, for releases that take them."""
    hooks_before = list(getattr(model, "_require_grads_hooks", None) or ())
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **options)
    else:
        raise AttributeError(f"{type(model).__name__} has no activation checkpointing (not a transformers PreTrainedModel).")
    if not (checkpoint_kwargs or {}).get("use_reentrant", True):
        _drop_input_grad_hooks(model, hooks_before)


def _drop_input_grad_hooks(model: nn.Module, keep: list) -> None:
    """Remove the hooks transformers' checkpointing just added to make the embeddings' output
    require grad (5.x adds them whatever the checkpointing): only reentrant checkpointing needs
    them. With a frozen embedding they make the first block differentiate its input for nothing,
    and that gradient, kept on the embeddings' output, lives until the step's graph is dropped.
    Hooks that were there before (the user's own enable_input_require_grads) stay."""
    added = [hook for hook in getattr(model, "_require_grads_hooks", None) or () if all(hook is not k for k in keep)]
    if not added:
        return
    for hook in added:
        hook.remove()
    model._require_grads_hooks = list(keep)
    if keep:
        model._require_grads_hook = keep[0]
    elif "_require_grads_hook" in vars(model):
        del model._require_grads_hook


def supports_checkpointing(model: nn.Module) -> bool:
    return hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks transformers recomputes under activation checkpointing (its decoder/encoder
    layers), outermost only."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - every supported transformers has it
        return []
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, GradientCheckpointingLayer):
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def block_variant(block: nn.Module) -> Hashable:
    """What can make one decoder layer run other code than another layer of its class given the
    same inputs: the attention type of models that mix sliding-window and full-attention layers
    (Gemma-2/3, Qwen2/3's layer_types) and a per-layer sliding window."""
    attention = getattr(block, "self_attn", None)
    # the layer type sits on the block in older transformers (attention_type), on its attention in 5.x
    kind = getattr(block, "attention_type", None) or getattr(attention, "layer_type", None)
    return kind, getattr(attention, "sliding_window", None)


def block_checkpoints(block: nn.Module) -> bool:
    """Whether this block recomputes its activations in training (transformers' per-layer flag)."""
    return getattr(block, "gradient_checkpointing", False) is True


@contextlib.contextmanager
def block_checkpointing_off(block: nn.Module) -> Iterator[None]:
    """The block's own forward without transformers' checkpointing, inside the context (for code
    that does the recomputing itself: kernels/block_graphs.py)."""
    had = block.__dict__.get("gradient_checkpointing", None)
    block.__dict__["gradient_checkpointing"] = False
    try:
        yield
    finally:
        if had is None:
            del block.__dict__["gradient_checkpointing"]
        else:
            block.__dict__["gradient_checkpointing"] = had


def attention_dropout(module: nn.Module) -> float:
    """The dropout probability an attention module applies in training (0.0 for other modules)."""
    p = getattr(module, "attention_dropout", 0.0)
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else 0.0


def rebuild_computed_buffers(model: nn.Module) -> list[str]:
    """Recompute the buffers a model computes from its config and no checkpoint holds (the rotary
    tables, ``inv_freq``), in place: after a build on the meta device and ``to_empty`` they hold
    whatever the memory held. Each module owning such buffers is built again from its ``config``
    (on the CPU; such modules hold no weights) and its buffers copied over. Returns their names;
    raises ValueError naming a module that has such buffers but cannot be rebuilt that way."""
    import torch

    rebuilt = []
    for name, module in model.named_modules():
        computed = sorted(b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None)
        if not computed:
            continue
        config = getattr(module, "config", None)
        try:
            with torch.device("cpu"):
                fresh = type(module)(config)
        except Exception as error:
            raise ValueError(f"{name or 'the model'} ({type(module).__name__}) computes buffers no checkpoint holds "
                             f"({', '.join(computed)}) and cannot be rebuilt from its config ({type(error).__name__}: "
                             f"{error}); build it off the meta device.") from error
        for buffer in computed:  # into the buffer in place: its dtype (a model cast to bf16 casts it too) stays
            module._buffers[buffer].copy_(fresh._buffers[buffer])
            rebuilt.append(f"{name}.{buffer}" if name else buffer)
    return rebuilt


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any block of the model recomputes its activations in training."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


__all__ = [
    "ARCHITECTURES", "Architecture", "BLOCK_CONTAINERS", "CACHE_NAMES", "FusedBlock", "architecture", "cache_argument",
    "allocate_static_cache", "attention_dropout", "block_checkpointing_off", "block_checkpoints", "block_variant", "cache_key_values", "cache_length",
    "checkpointable_blocks", "checkpointing_enabled", "clear_output_cache", "enable_checkpointing",
    "causal_lm_output", "final_logit_softcap", "fused_block", "fused_classes", "get_cache", "has_plain_lm_head", "loss_is_plain_cross_entropy", "is_conv1d", "is_encoder_only",
    "is_linear_like", "is_norm", "is_quantized_linear", "is_silu", "gated_activation", "linear_out_features", "model_family",
    "model_type", "new_cache", "new_static_cache", "rebuild_computed_buffers", "role_patterns", "set_cache", "set_static_cache_length", "static_cache_has_sliding_layers", "static_decode_kwargs", "supports_static_cache", "shifts_labels", "suffix_regex", "supports_checkpointing", "task_heads", "transformers_version", "TASK_HEADS",
]
