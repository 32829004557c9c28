"""Soft prompts: prompt tuning (Lester et al. 2021), P-tuning (Liu et al. 2021) and prefix tuning
(Li & Liang 2021). None changes a weight; each adds inputs the frozen model attends to.

* Prompt tuning / P-tuning insert n virtual token embeddings into the input. input_ids become
  inputs_embeds with the tokens inserted; attention_mask, position_ids, token_type_ids and
  per-token labels grow to match (with -100: the loss has the targets it has without the
  adapter), and token-level logits come back trimmed to the caller's length. The tokens go
  first, except in BERT-style encoders, where they follow the first token: the classifier
  pools position 0, which so stays [CLS].
* Prefix tuning puts n learned key/value vectors in front of every attention layer's keys and
  values. In transformers models they go through the model's own key/value cache (DynamicCache,
  filled before the first forward of a sequence), so generate() keeps working and grouped-query
  attention gets prefixes of the key/value width (num_key_value_heads × head_dim); the caller's
  tokens keep positions 0, 1, … since prefixes have none. Models without a transformers cache
  get them through a wrapper of each torch.nn.MultiheadAttention, which sees its keys and values.

The tensors live in one wrapper of the input embedding (or of each MultiheadAttention), so the
core saves, loads, activates and deletes them like any layer adapter; hooks on the top model do
the rest, and only while the adapter is active and not disabled. Decoding steps after the first
reuse the cache; a mark on the cache object says it holds the virtual tokens / prefixes already.

P-tuning's prompt encoder and prefix tuning's reparameterisation MLP are saved folded: the file
holds their output and loads as a plain table. So that a folded file can also be trained further
(load(..., is_trainable=True) brings a fresh encoder back), the tokens are
`encoder(seeds) + (table − anchor)`, `anchor` being the encoder's output when `table` was last
written: exactly encoder(seeds) in a fresh adapter (table = anchor), the saved tokens after a load.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, ConfigError
from .. import hf_compat
from ..inject import set_submodule
from ..layer import DeltaLayer
from ..registry import MethodInfo, register_method

INITS = ("random", "sample_vocab", "text")
POSITIONS = ("auto", "start", "after_first")
ENCODERS = ("MLP", "LSTM")
_CACHE_MARK = "_deltatune_virtual_tokens"  # set on a key/value cache that holds our tokens
_CHECKPOINTING_DROPS_CACHE = (
    "Prefix tuning needs the model's key/value cache, which transformers drops under gradient checkpointing "
    "in training, so the prefixes would be ignored. Turn gradient checkpointing off for prefix tuning."
)


# -- configs ------------------------------------------------------------------------------------
@dataclass
class _VirtualTokenConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    token_dim: int | None = None  # the model's hidden size; None reads it from the model

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")
        if self.target_modules or self.target_types or self.layers_to_transform is not None:
            raise ConfigError(
                f"{type(self).__name__} acts on the input and on every attention layer; target_modules, "
                f"target_types and layers_to_transform do not apply. Leave them unset."
            )

    def _check_position(self, position: str) -> None:
        if position not in POSITIONS:
            raise ConfigError(f"virtual_token_position must be one of {POSITIONS}, got {position!r}.")


@dataclass
class PromptTuningConfig(_VirtualTokenConfig):
    """num_virtual_tokens: trainable embeddings inserted into the input;
    prompt_tuning_init: "random" (normal, with the embedding table's std), "sample_vocab" (the
        embeddings of random vocabulary tokens) or "text" (those of prompt_tuning_init_text,
        repeated to fill num_virtual_tokens; needs dt.wrap(..., tokenizer=tok) or tokenizer_name_or_path);
    virtual_token_position: "start", "after_first" (keeps [CLS] at position 0) or "auto"
        (after_first for BERT-style encoders, start otherwise)."""

    method = "prompt"
    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = "random"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    virtual_token_position: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tuning_init, str):
            self.prompt_tuning_init = self.prompt_tuning_init.lower()  # peft writes "TEXT", "RANDOM"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "text" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init='text' needs prompt_tuning_init_text, the text to start from.")
        self._check_position(self.virtual_token_position)


@dataclass
class PTuningConfig(_VirtualTokenConfig):
    """num_virtual_tokens: virtual tokens, produced by a prompt encoder from trainable seeds;
    encoder_reparameterization_type: "MLP" (3 layers) or "LSTM" (a bidirectional LSTM, then 2 layers);
    encoder_hidden_size: the encoder's width (None: the model's hidden size);
    encoder_num_layers: LSTM layers; virtual_token_position: as for prompt tuning.
    The saved file holds the encoder's output only."""

    method = "ptuning"
    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    virtual_token_position: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.encoder_reparameterization_type, str):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.upper()
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ENCODERS:
            raise ConfigError(
                f"encoder_reparameterization_type must be one of {ENCODERS}, got {self.encoder_reparameterization_type!r}."
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")
        if self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers must be >= 1, got {self.encoder_num_layers}.")
        self._check_position(self.virtual_token_position)


@dataclass
class PrefixTuningConfig(_VirtualTokenConfig):
    """num_virtual_tokens: the prefix length (key/value vectors per attention layer);
    prefix_projection: train the prefixes through an MLP (Li & Liang's reparameterisation),
        folded away when saved; encoder_hidden_size: that MLP's width (None: the hidden size)."""

    method = "prefix"
    peft_type = "PREFIX_TUNING"

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}.")


# -- tensors ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """How one adapter acts: where its tokens go, and the shape of its prefixes."""

    kind: str  # "prompt" (virtual tokens in the input) or "prefix" (key/value cache)
    tokens: int
    insert_at: int = 0
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    context: int | None = None  # the model's max positions, when it has a limit
    # A BERT-style encoder: no label shift, and its mask must name the prefixes (it reads no cache).
    bidirectional: bool = False

    def check_context(self, input_tokens: int) -> None:
        used = input_tokens + (self.tokens if self.kind == "prompt" else 0)
        if self.context is not None and used > self.context:
            virtual = f" + {self.tokens} virtual tokens" if self.kind == "prompt" else ""
            raise ValueError(
                f"{input_tokens} input tokens{virtual} need {used} positions, more than the model's context of "
                f"{self.context} (max_position_embeddings). Shorten the input"
                + (" or lower num_virtual_tokens." if virtual else ".")
            )


class PromptEncoder(nn.Module):
    """Trainable seeds through [a bidirectional LSTM and] an MLP; `anchor` is the output at the last fold."""

    def __init__(self, seeds: torch.Tensor, mlp: nn.Sequential, lstm: nn.LSTM | None = None) -> None:
        super().__init__()
        self.seeds = nn.Parameter(seeds)
        self.lstm = lstm
        self.mlp = mlp
        anchor = torch.zeros(seeds.shape[0], mlp[-1].out_features, dtype=seeds.dtype, device=seeds.device)
        self.register_buffer("anchor", anchor, persistent=False)

    def forward(self) -> torch.Tensor:
        hidden = self.seeds if self.lstm is None else self.lstm(self.seeds[None])[0][0]
        return self.mlp(hidden)


class _TokenTables(DeltaLayer):
    """Per-adapter tables (`prompt_embeddings`), optionally produced by a `prompt_encoder`."""

    adapter_attributes = ("prompt_embeddings", "prompt_encoder")
    extends_sequence = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        self.prompt_encoder = nn.ModuleDict()
        self.plans: dict[str, _Plan] = {}

    def add_tables(self, adapter_name: str, plan: _Plan, table: torch.Tensor | None = None,
                   encoder: PromptEncoder | None = None) -> None:
        """A trainable `table`, or tokens made by `encoder` (the table then holds them as last folded)."""
        if encoder is not None:
            # Start folded (table = anchor = output), so the tokens are exactly encoder(seeds).
            with torch.no_grad():
                if not encoder.seeds.is_meta:
                    encoder.anchor.copy_(encoder())
            table = encoder.anchor.clone()
            self.prompt_encoder[adapter_name] = encoder
        self.plans[adapter_name] = plan
        self.prompt_embeddings[adapter_name] = nn.Parameter(table)

    def virtual_tokens(self, adapter_name: str) -> torch.Tensor:
        table = self.prompt_embeddings[adapter_name]
        if adapter_name not in self.prompt_encoder:
            return table
        encoder = self.prompt_encoder[adapter_name]
        return encoder() + (table - encoder.anchor)

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        if adapter_name in self.prompt_encoder:
            yield from self.prompt_encoder[adapter_name].parameters()
        elif adapter_name in self.prompt_embeddings:
            yield self.prompt_embeddings[adapter_name]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tokens themselves: an encoder is folded into its table (the tokens do not change)."""
        table = self.prompt_embeddings[adapter_name]
        if adapter_name in self.prompt_encoder and not table.is_meta:
            encoder = self.prompt_encoder[adapter_name]
            with torch.no_grad():
                output = encoder()
                table.copy_(output + (table - encoder.anchor))
                encoder.anchor.copy_(output)
        return {"prompt_embeddings": table}

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.plans.pop(adapter_name, None)

    def active_adapter(self) -> str | None:
        active = [name for name in self.active_unmerged() if name in self.plans]
        if len(active) > 1:
            raise RuntimeError(
                f"Several soft-prompt adapters are active ({active}); their tokens cannot share one input. "
                f"Activate one of them with model.set_adapter(name)."
            )
        return active[0] if active else None


class VirtualTokens(_TokenTables):
    """Wraps a transformers model's input embedding; hooks on the model do the work."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._handles: list = []
        self.bypass = False  # set while the prefix init runs the plain model
        self._inserted: tuple[int, int, int] | None = None  # (at, count, total length) for the post-hook
        self._filled: tuple[Any, int, bool] | None = None  # (cache, prefix length, drop it) for the post-hook

    def hook_into(self, host: nn.Module) -> None:
        # Bound methods: a deep copy of the model gets hooks bound to its own copy of this layer.
        self._handles = [
            host.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            host.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.adapter_names:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def prefix_states(self, adapter_name: str, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (layers, batch, kv_heads, prefix length, head_dim)."""
        plan = self.plans[adapter_name]
        flat = self.virtual_tokens(adapter_name).to(dtype)
        states = flat.view(plan.tokens, plan.layers, 2, plan.kv_heads, plan.head_dim).permute(1, 2, 3, 0, 4)
        states = states[:, :, None].expand(-1, -1, batch, -1, -1, -1)
        return states[:, 0], states[:, 1]

    # -- hooks --------------------------------------------------------------------------------
    def _before_forward(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._inserted = self._filled = None
        name = None if self.bypass else self.active_adapter()
        if name is None:
            return None
        kwargs = _named_inputs(host, args, kwargs)
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() != 2:
            raise ValueError("Soft prompts need a 2-D attention_mask (batch, length); got a prepared 4-D mask.")
        plan = self.plans[name]
        if plan.kind == "prompt":
            self._insert_tokens(name, plan, kwargs)
        else:
            self._fill_prefix(name, plan, host, kwargs)
        return (), kwargs

    def _insert_tokens(self, name: str, plan: _Plan, kw: dict) -> None:
        count, at = plan.tokens, plan.insert_at
        cache = hf_compat.get_cache(kw)
        past = hf_compat.cache_length(cache)
        if past:  # a decoding step: the cache holds the virtual tokens already
            if getattr(cache, _CACHE_MARK, None) == count:
                plan.check_context(past - count + _input_length(kw))
                if kw.get("attention_mask") is not None:
                    kw["attention_mask"] = _insert_filled(kw["attention_mask"], at, count, 1)
                if kw.get("position_ids") is not None:
                    kw["position_ids"] = kw["position_ids"] + count
            return
        embeds, ids = kw.pop("inputs_embeds", None), kw.pop("input_ids", None)
        if embeds is None:
            embeds = self.base_layer(ids)
        batch, length = embeds.shape[:2]
        plan.check_context(length)
        tokens = self.virtual_tokens(name).to(embeds.dtype)[None].expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([embeds[:, :at], tokens, embeds[:, at:]], dim=1)
        if kw.get("attention_mask") is not None:  # none means none is needed: the tokens are attended
            kw["attention_mask"] = _insert_filled(kw["attention_mask"], at, count, 1)
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = _insert_filled(kw["token_type_ids"], at, count, 0)
        labels = kw.get("labels")
        if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # per-token labels only
            labels = _insert_filled(labels, at, count, -100)
            if not plan.bidirectional and at + count < labels.shape[1]:
                # Nor is the first real token a target (from the last virtual one): the loss keeps
                # exactly the targets it has without the adapter.
                labels[:, at + count] = -100
            kw["labels"] = labels
        positions = kw.get("position_ids")
        if positions is not None:
            start = positions[:, at - 1 : at] + 1 if at else torch.zeros_like(positions[:, :1])
            virtual = start + torch.arange(count, device=positions.device)
            kw["position_ids"] = torch.cat([positions[:, :at], virtual, positions[:, at:] + count], dim=1)
        if cache is not None:
            setattr(cache, _CACHE_MARK, count)
        self._inserted = (at, count, length + count)

    def _fill_prefix(self, name: str, plan: _Plan, host: nn.Module, kw: dict) -> None:
        count = plan.tokens
        cache = hf_compat.get_cache(kw)
        past = hf_compat.cache_length(cache)
        reference = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        batch, length, device = reference.shape[0], reference.shape[1], reference.device
        mask = kw.get("attention_mask")
        if past:  # a decoding step: the cache holds the prefixes already
            if getattr(cache, _CACHE_MARK, None) == count:
                plan.check_context(past - count + length)
                if mask is not None:
                    kw["attention_mask"] = _insert_filled(mask, 0, count, 1)
                if kw.get("position_ids") is None:
                    kw["position_ids"] = (torch.arange(length, device=device) + past - count)[None]
            return
        plan.check_context(length)
        dtype = kw["inputs_embeds"].dtype if kw.get("inputs_embeds") is not None else self.get_base_layer().weight.dtype
        if host.training and hf_compat.checkpointing_enabled(host):
            raise RuntimeError(_CHECKPOINTING_DROPS_CACHE)
        # A caller that asked for no cache must not get ours back (generate would feed it in again).
        wants_cache = kw.get("use_cache", getattr(host.config, "use_cache", True)) is not False
        drop_from_output = cache is None and not wants_cache
        cache = hf_compat.new_cache(host.config) if cache is None else cache
        keys, values = self.prefix_states(name, batch, dtype)
        for layer_idx in range(plan.layers):
            cache.update(keys[layer_idx], values[layer_idx], layer_idx)
        setattr(cache, _CACHE_MARK, count)
        hf_compat.set_cache(kw, host, cache)
        if mask is not None:
            kw["attention_mask"] = _insert_filled(mask, 0, count, 1)
        elif plan.bidirectional:  # decoders size a missing mask from the cache; encoders cannot
            # Additive and already 4-D, so it is used as it is (a 2-D one is inspected, which a meta model cannot).
            kw["attention_mask"] = torch.zeros(batch, 1, length, count + length, dtype=dtype, device=device)
        if kw.get("position_ids") is None:  # the model would start after the prefix
            kw["position_ids"] = torch.arange(length, device=device)[None]
        self._filled = (cache, count, drop_from_output)

    def _after_forward(self, host: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        inserted, filled = self._inserted, self._filled
        self._inserted = self._filled = None
        if filled is not None:
            cache, count, drop_from_output = filled
            if hf_compat.cache_length(cache) <= count:
                raise RuntimeError(_CHECKPOINTING_DROPS_CACHE)
            if drop_from_output and isinstance(output, dict):
                hf_compat.clear_output_cache(output, cache)
        if inserted is None or not isinstance(output, dict):
            return output
        at, count, total = inserted
        if hf_compat.get_cache(output) is not None:
            setattr(hf_compat.get_cache(output), _CACHE_MARK, count)
        logits = output.get("logits")
        if torch.is_tensor(logits) and logits.dim() >= 3 and logits.shape[1] == total:
            output["logits"] = torch.cat([logits[:, :at], logits[:, at + count :]], dim=1)
        return output


class PrefixAttention(_TokenTables):
    """Prefix tuning on a torch.nn.MultiheadAttention (models without a transformers cache).

    Keys and values are projected here, the prefixes put in front, and the result handed to
    torch's attention as precomputed keys/values; masks grow by the prefix length.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):
                raise
            return getattr(self.get_base_layer(), name)  # nn.TransformerEncoderLayer reads batch_first etc.

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # False keeps nn.TransformerEncoderLayer off its fused fast path, which would skip this forward.
        return False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        name = self.active_adapter()
        mha = self.get_base_layer()
        if name is None:
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        count, batch, heads = self.plans[name].tokens, query.shape[1], mha.num_heads
        w_k, w_v = mha.in_proj_weight.chunk(3)[1:]
        b_k, b_v = mha.in_proj_bias.chunk(3)[1:] if mha.in_proj_bias is not None else (None, None)
        prefix = self.virtual_tokens(name).to(query.dtype).view(count, 2, -1)[:, :, None].expand(-1, -1, batch, -1)
        keys = torch.cat([prefix[:, 0], F.linear(key, w_k, b_k)])  # (count + source, batch, embed)
        values = torch.cat([prefix[:, 1], F.linear(value, w_v, b_v)])
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(query.shape[0], key.shape[0], dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            attn_mask = _insert_filled(attn_mask, 0, count, False if attn_mask.dtype == torch.bool else 0.0, dim=-1)
        if key_padding_mask is not None:
            key_padding_mask = _insert_filled(key_padding_mask, 0, count, False if key_padding_mask.dtype == torch.bool else 0.0)
        split = lambda t: t.reshape(t.shape[0], batch * heads, -1).transpose(0, 1)  # noqa: E731
        out, weights = F.multi_head_attention_forward(
            query, keys, values, mha.embed_dim, heads, mha.in_proj_weight, mha.in_proj_bias, None, None,
            mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            static_k=split(keys), static_v=split(values), average_attn_weights=average_attn_weights,
        )
        return (out.transpose(0, 1) if mha.batch_first else out), weights


# -- helpers ------------------------------------------------------------------------------------
def _insert_filled(tensor: torch.Tensor, at: int, count: int, value: float, dim: int = 1) -> torch.Tensor:
    """`tensor` with `count` entries of `value` inserted at index `at` along `dim`."""
    shape = list(tensor.shape)
    shape[dim] = count
    block = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor.narrow(dim, 0, at), block, tensor.narrow(dim, at, tensor.shape[dim] - at)], dim=dim)


def _input_length(kw: dict) -> int:
    reference = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
    return reference.shape[1]


def _named_inputs(host: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(host.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision tables lose the small updates; keep them in float32 like peft does.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _sample_rows(weight: torch.Tensor, count: int) -> torch.Tensor:
    ids = torch.randint(0, weight.shape[0], (count,), device=weight.device)
    return weight.detach()[ids].to(_adapter_dtype(weight)).clone()


def _transformers_host(model: nn.Module, method: str) -> tuple[Any, int]:
    """(model config, hidden size) of a decoder-only or encoder-only transformers model."""
    config = getattr(model, "config", None)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if config is None or not callable(get_embeddings) or get_embeddings() is None:
        raise ConfigError(
            f"{method} needs a transformers model with get_input_embeddings() (a PreTrainedModel); "
            f"{type(model).__name__} has none. (Prefix tuning also works on models built from torch.nn.MultiheadAttention.)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{method} supports decoder-only and encoder-only models; {type(model).__name__} is an encoder-decoder."
        )
    return config, get_embeddings().weight.shape[1]


def _embedding_layer(model: nn.Module) -> VirtualTokens:
    embedding = model.get_input_embeddings()
    if isinstance(embedding, VirtualTokens):
        return embedding
    path = next(name for name, module in model.named_modules() if module is embedding)
    layer = VirtualTokens(embedding)
    set_submodule(model, path, layer)
    layer.hook_into(model)
    return layer


def _check_token_dim(config: _VirtualTokenConfig, hidden: int) -> None:
    if config.token_dim is not None and config.token_dim != hidden:
        raise ConfigError(f"token_dim={config.token_dim} but the model's hidden size is {hidden}; leave token_dim unset.")


def _token_plan(model: nn.Module, config: PromptTuningConfig | PTuningConfig) -> _Plan:
    model_config, hidden = _transformers_host(model, config.method)
    _check_token_dim(config, hidden)
    encoder = _is_bidirectional(model)
    position = config.virtual_token_position
    if position == "auto":
        position = "after_first" if encoder else "start"
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and config.num_virtual_tokens >= context:
        raise ConfigError(
            f"num_virtual_tokens={config.num_virtual_tokens} fills the model's whole context of {context} positions, "
            f"leaving none for the input; use fewer virtual tokens."
        )
    at = 1 if position == "after_first" else 0
    return _Plan("prompt", config.num_virtual_tokens, insert_at=at, context=context, bidirectional=encoder)


def _init_text_ids(config: PromptTuningConfig, tokenizer: Any, vocab: int) -> list[int]:
    if tokenizer is None and config.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    if tokenizer is None:
        raise ConfigError(
            "prompt_tuning_init='text' needs a tokenizer: pass dt.wrap(model, config, tokenizer=tok) "
            "or set tokenizer_name_or_path in the config (dt.load(..., is_trainable=True) can only use the latter)."
        )
    ids = list(tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"])
    count = config.num_virtual_tokens
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens.")
    if len(ids) > count:
        raise ConfigError(
            f"prompt_tuning_init_text tokenizes to {len(ids)} tokens, more than num_virtual_tokens={count}. "
            f"Raise num_virtual_tokens to at least {len(ids)} or shorten the text."
        )
    if max(ids) >= vocab:
        raise ConfigError(f"The tokenizer gives token id {max(ids)}, outside the model's vocabulary of {vocab}.")
    return (ids * math.ceil(count / len(ids)))[:count]  # repeated to fill, as peft does


def _prompt_table(config: PromptTuningConfig, weight: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    count, dtype = config.num_virtual_tokens, _adapter_dtype(weight)
    if config.prompt_tuning_init == "text":
        ids = torch.tensor(_init_text_ids(config, tokenizer, weight.shape[0]), device=weight.device)
        return weight.detach()[ids].to(dtype).clone()
    if config.prompt_tuning_init == "sample_vocab":
        return _sample_rows(weight, count)
    # peft's N(0, 1) is far larger than trained token embeddings; match the table's scale instead.
    return torch.randn(count, weight.shape[1], device=weight.device, dtype=dtype) * weight.detach().float().std().to(dtype)


def _ptuning_encoder(config: PTuningConfig, weight: torch.Tensor) -> PromptEncoder:
    dim = weight.shape[1]
    hidden = config.encoder_hidden_size or dim
    kw = {"device": weight.device, "dtype": _adapter_dtype(weight)}
    seeds = torch.randn(config.num_virtual_tokens, dim, **kw)
    if config.encoder_reparameterization_type == "LSTM":
        lstm = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, bidirectional=True, batch_first=True, **kw)
        mlp = nn.Sequential(nn.Linear(2 * hidden, hidden, **kw), nn.ReLU(), nn.Linear(hidden, dim, **kw))
        return PromptEncoder(seeds, mlp, lstm)
    mlp = nn.Sequential(
        nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw), nn.ReLU(), nn.Linear(hidden, dim, **kw)
    )
    return PromptEncoder(seeds, mlp)


@contextlib.contextmanager
def _hooks_bypassed(model: nn.Module) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, VirtualTokens)]
    for layer in layers:
        layer.bypass = True
    try:
        yield
    finally:
        for layer in layers:
            layer.bypass = False


def _is_bidirectional(model: nn.Module) -> bool:
    return hf_compat.is_encoder_only(model)


def _prefix_plan(model: nn.Module, model_config: Any, count: int) -> _Plan:
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    context = getattr(model_config, "max_position_embeddings", None)
    return _Plan("prefix", count, layers=model_config.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim,
                 context=context, bidirectional=_is_bidirectional(model))


def _prefix_from_activations(model: nn.Module, plan: _Plan, weight: torch.Tensor) -> torch.Tensor:
    """Keys/values the model computes for random real tokens: a start inside the model's range."""
    width = plan.layers * 2 * plan.kv_heads * plan.head_dim
    if weight.is_meta:
        return torch.zeros(plan.tokens, width, device="meta", dtype=_adapter_dtype(weight))
    ids = torch.randint(0, weight.shape[0], (1, plan.tokens), device=weight.device)
    cache = hf_compat.new_cache(model.config)
    inputs = {"input_ids": ids, "use_cache": True}
    hf_compat.set_cache(inputs, model, cache)
    with torch.no_grad(), _hooks_bypassed(model):
        model(**inputs)
    if hf_compat.cache_length(cache) != plan.tokens:
        raise RuntimeError(_CHECKPOINTING_DROPS_CACHE)
    layers = hf_compat.cache_key_values(cache)[: plan.layers]
    states = torch.stack([torch.stack([keys[0], values[0]]) for keys, values in layers])
    if tuple(states.shape) != (plan.layers, 2, plan.kv_heads, plan.tokens, plan.head_dim):
        raise ConfigError(f"The model's key/value cache has shape {tuple(states.shape)}, not the one its config describes.")
    return states.permute(3, 0, 1, 2, 4).reshape(plan.tokens, width).to(_adapter_dtype(weight)).clone()


def _prefix_encoder(config: PrefixTuningConfig, dim: int, width: int, like: torch.Tensor) -> PromptEncoder:
    hidden = config.encoder_hidden_size or dim
    kw = {"device": like.device, "dtype": _adapter_dtype(like)}
    seeds = torch.randn(config.num_virtual_tokens, dim, **kw)
    return PromptEncoder(seeds, nn.Sequential(nn.Linear(dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, width, **kw)))


# -- attach -------------------------------------------------------------------------------------
def _placeholder(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The table of an adapter loaded for inference: its values come from the file."""
    return torch.zeros(rows, width, device=like.device, dtype=_adapter_dtype(like))


def _attach_prompt(model: nn.Module, config: PromptTuningConfig, adapter_name: str, tokenizer: Any = None,
                   saved_tensors: dict | None = None, **_: Any) -> None:
    plan = _token_plan(model, config)
    weight = model.get_input_embeddings().weight
    if config.inference_mode or saved_tensors is not None:  # the values come from the file: no tokenizer needed
        table = _placeholder(plan.tokens, weight.shape[1], weight)
    else:
        table = _prompt_table(config, weight, tokenizer)
    _embedding_layer(model).add_tables(adapter_name, plan, table)


def _attach_ptuning(model: nn.Module, config: PTuningConfig, adapter_name: str, **_: Any) -> None:
    plan = _token_plan(model, config)
    weight = model.get_input_embeddings().weight
    if config.inference_mode:  # saved folded: a plain table
        _embedding_layer(model).add_tables(adapter_name, plan, _placeholder(plan.tokens, weight.shape[1], weight))
    else:
        _embedding_layer(model).add_tables(adapter_name, plan, encoder=_ptuning_encoder(config, weight))


def _attach_prefix(model: nn.Module, config: PrefixTuningConfig, adapter_name: str,
                   saved_tensors: dict | None = None, **_: Any) -> None:
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention and getattr(model, "config", None) is None:
        return _attach_prefix_to_attention(model, config, adapter_name, attention)
    model_config, hidden = _transformers_host(model, "prefix")
    _check_token_dim(config, hidden)
    plan = _prefix_plan(model, model_config, config.num_virtual_tokens)
    weight = model.get_input_embeddings().weight
    width = plan.layers * 2 * plan.kv_heads * plan.head_dim
    if config.inference_mode:  # saved folded: a plain table
        _embedding_layer(model).add_tables(adapter_name, plan, _placeholder(plan.tokens, width, weight))
    elif config.prefix_projection:
        _embedding_layer(model).add_tables(adapter_name, plan, encoder=_prefix_encoder(config, hidden, width, weight))
    elif saved_tensors is not None:  # loading for more training: no need to run the model for a start
        _embedding_layer(model).add_tables(adapter_name, plan, _placeholder(plan.tokens, width, weight))
    else:
        _embedding_layer(model).add_tables(adapter_name, plan, _prefix_from_activations(model, plan, weight))


def _attach_prefix_to_attention(model: nn.Module, config: PrefixTuningConfig, adapter_name: str, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        mha = module.get_base_layer() if isinstance(module, DeltaLayer) else module
        if not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise ConfigError(f"Prefix tuning on {name!r} needs a MultiheadAttention without kdim/vdim and add_bias_kv.")
        _check_token_dim(config, mha.embed_dim)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, PrefixAttention):
            module = PrefixAttention(module)
            set_submodule(model, name, module)
        mha, count = module.get_base_layer(), config.num_virtual_tokens
        # Values in the scale of the attention's own projections of unit-variance inputs.
        weight, plan = mha.in_proj_weight, _Plan("prefix", count)
        if config.prefix_projection and not config.inference_mode:
            module.add_tables(adapter_name, plan, encoder=_prefix_encoder(config, mha.embed_dim, 2 * mha.embed_dim, weight))
            continue
        scale = weight.detach().float().pow(2).sum(1).mean().sqrt()
        table = torch.randn(count, 2 * mha.embed_dim, device=weight.device) * scale
        module.add_tables(adapter_name, plan, table.to(_adapter_dtype(weight)))


register_method(MethodInfo(
    name="prompt", config_class=PromptTuningConfig, attach=_attach_prompt, kind="soft-prompt", mergeable=False,
    description="Trainable virtual-token embeddings inserted into the input (Lester et al.)",
    compare_defaults={"num_virtual_tokens": 20, "prompt_tuning_init": "sample_vocab", "lr": 3e-2},
    search_space=lambda trial: {"num_virtual_tokens": trial.suggest_categorical("num_virtual_tokens", [5, 10, 20, 50])},
))
register_method(MethodInfo(
    name="ptuning", config_class=PTuningConfig, attach=_attach_ptuning, kind="soft-prompt", mergeable=False,
    description="Virtual tokens produced by a trainable prompt encoder, saved as its output (Liu et al.)",
    compare_defaults={
        "num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP", "encoder_hidden_size": 128, "lr": 1e-3,
    },
))
register_method(MethodInfo(
    name="prefix", config_class=PrefixTuningConfig, attach=_attach_prefix, kind="soft-prompt", mergeable=False,
    description="Trainable key/value prefixes in every attention layer, via the model's cache (Li & Liang)",
    compare_defaults={"num_virtual_tokens": 20, "prefix_projection": False, "lr": 1e-2},
))

__all__ = ["PTuningConfig", "PrefixAttention", "PrefixTuningConfig", "PromptEncoder", "PromptTuningConfig", "VirtualTokens"]
