"""The model wrapper: owns named adapters over one frozen base model.

It is a plain nn.Module whose forward is the base model's forward, so `generate()`, Hugging Face
`Trainer` and `torch.compile` see the model they expect; unknown attributes forward to the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import distributed, hf_compat
from .config import AdapterConfig, ConfigError, read_config_dict
from .kernels.patch import has_fused_path, is_patched, patch_model_for_training, unpatch_model
from .inject import set_submodule, wrap_modules_to_save
from .io import KEY_PREFIX, AdapterFileError, check_tensor_fits, read_adapter, save_adapter_files
from .layer import BASE_ROW, DeltaLayer, ModulesToSave, RowAdapters, packed_parameter_count
from .mixed_batch import InputGroup
from .registry import combining_methods, method_for_config, method_for_peft_type

DEFAULT_ADAPTER = "default"
FUSED_CHOICES = ("auto", True, False)


def _check_fused(fused: Any, model: nn.Module) -> bool | str:
    # `is`, not ==: 1 and 0 are not choices, and neither is the string "true".
    if not any(fused is choice for choice in FUSED_CHOICES):
        raise ConfigError(f"fused must be one of 'auto', True or False, got {fused!r}.")
    if fused is True and not has_fused_path(model):
        with_path = sorted({t for arch in hf_compat.ARCHITECTURES for t in (arch.fused or {})})
        raise ConfigError(
            f"fused=True, but {type(model).__name__} (model type {hf_compat.model_type(model)!r}) has no fused "
            f"training path; model types with one: {', '.join(with_path)}. Use fused='auto' or False."
        )
    return fused


@dataclass
class ParameterReport:
    """How much of the model trains: count, share of all parameters, bytes, per method."""

    trainable: int
    total: int
    trainable_bytes: int
    by_method: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v:,}" for k, v in self.by_method.items())
        return (
            f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%), "
            f"{self.trainable_bytes / 2**20:.2f} MiB" + (f" [{parts}]" if parts else "")
        )


def _read_folder(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config (as its method's class) and the tensors of one save in an adapter folder."""
    method_for_peft_type(str(read_config_dict(directory)["peft_type"]))  # a foreign method: said before the weights are read
    files = read_adapter(directory)
    info = method_for_peft_type(str(files.config["peft_type"]))
    return info.config_class.from_dict(files.config, foreign_ok=True), files.tensors


_MERGE_IN_ONE_PROCESS = ("For a plain merged model, save the adapter (model.save(dir), every rank), then merge it "
                         "in one process: dt.load(base_model, dir).merge_and_unload().")


def _base_weights(state: dict[str, torch.Tensor], plain: nn.Module) -> dict[str, torch.Tensor]:
    """`plain`'s state dict taken from the state of the same model wrapped by deltatune: a wrapped
    module's own tensors sit one `base_layer.` hop (or more, for nested wrappers) further down."""
    found = {}
    for key in plain.state_dict():
        module, _, leaf = key.rpartition(".")
        prefix = f"{module}." if module else ""
        for hops in range(4):
            candidate = f"{prefix}{'base_layer.' * hops}{leaf}"
            if candidate in state:
                found[key] = state[candidate]
                break
        else:
            raise distributed.DistributedError(f"the gathered sharded model has no tensor for {key!r}. {_MERGE_IN_ONE_PROCESS}")
    return found


def _check_row_count(adapter_names: Sequence[str | None], args: tuple, kwargs: dict) -> None:
    """adapter_names needs one entry per row of the input (when the input is a tensor we can see)."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if len(adapter_names) != value.shape[0]:
                raise ValueError(
                    f"adapter_names has {len(adapter_names)} entries for an input of {value.shape[0]} rows; "
                    f"give one adapter name (or None for the base model) per row."
                )
            return


# Config fields that do not change an adapter's layers: two configs equal but for these can swap
# weights in place.
_STRUCTURE_NEUTRAL_FIELDS = ("base_model_name_or_path", "revision", "inference_mode")


def _structure_fields(config: AdapterConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _STRUCTURE_NEUTRAL_FIELDS}


def _same_structure(old: AdapterConfig, new: AdapterConfig) -> bool:
    return type(old) is type(new) and _structure_fields(old) == _structure_fields(new)


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class_for(base_class: type) -> type:
    """A DeltaModel subclass whose forward shows the base class's own signature (plus
    adapter_names). Tools that read it see the model's real arguments: Hugging Face Trainer keeps
    the dataset columns the model takes and finds its label names. It adds nothing else; one per
    base class."""
    if base_class in _WRAPPER_CLASSES:
        return _WRAPPER_CLASSES[base_class]
    try:
        signature = inspect.signature(base_class.forward)
    except (TypeError, ValueError):  # a forward without a readable signature: keep the plain one
        return DeltaModel
    parameters = list(signature.parameters.values())
    if any(p.name == "adapter_names" for p in parameters):
        return DeltaModel
    routing = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_keyword = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    parameters = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD] + [routing] + var_keyword

    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        return DeltaModel.forward(self, *args, adapter_names=adapter_names, **kwargs)

    forward.__signature__ = signature.replace(parameters=parameters)
    forward.__doc__ = DeltaModel.forward.__doc__

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Pickled as "the wrapper class of this base class" (the class is made at run time).
        return _rebuild_wrapper, (base_class,), self.__dict__.copy()

    # The base class's name inside ours: Trainer reads "QuestionAnswering" from it for label names.
    name = f"DeltaModel[{base_class.__name__}]"
    _WRAPPER_CLASSES[base_class] = type(name, (DeltaModel,), {
        "forward": forward, "__reduce_ex__": __reduce_ex__, "__module__": __name__, "__qualname__": name})
    return _WRAPPER_CLASSES[base_class]


def _rebuild_wrapper(base_class: type) -> DeltaModel:
    """Unpickling: an empty instance of the wrapper class for `base_class` (its state follows)."""
    return nn.Module.__new__(_wrapper_class_for(base_class))


class DeltaModel(nn.Module):
    """A frozen base model plus named adapters of any registered method."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = DEFAULT_ADAPTER,
                 fused: bool | str = "auto", **build_kwargs: Any) -> None:
        super().__init__()
        if isinstance(model, DeltaModel):
            raise TypeError("This model is already wrapped; call .add_adapter() on it instead.")
        self.fused = _check_fused(fused, model)
        if type(self) is DeltaModel:  # a user's own subclass keeps its class
            self.__class__ = _wrapper_class_for(type(model))
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.train(model.training)
        for param in model.parameters():
            param.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config, activate=True, **build_kwargs)

    # -- forwarding -----------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward. adapter_names (one per batch row: an adapter name, or
        None / "__base__" for the base alone) runs each row with its own adapter in one pass.

        A causal LM in training with `labels=` (unless fused=False) gets its loss from the chunked
        cross-entropy (deltatune.kernels.labels_forward): the same loss and gradients without the
        float32 logits, and `logits` is None in the output."""
        if adapter_names is None:
            if self.fused is not False:
                from .kernels.cross_entropy import labels_forward

                output = labels_forward(self.model, args, kwargs)
                if output is not None:
                    return output
            return self.model(*args, **kwargs)
        _check_row_count(adapter_names, args, kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's generate(); adapter_names as in forward (one per input row)."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        # Checked before expanding: past it, a wrong count would be reported in expanded rows.
        _check_row_count(adapter_names, args, kwargs)
        # generate() repeats each row (num_beams for beam search, else num_return_sequences);
        # every copy keeps its row's adapter.
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
        copies = beams if beams > 1 else kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
        expanded = [name for name in adapter_names for _ in range(copies)]
        with self.mixed_batch(expanded):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str | None] | RowAdapters) -> Iterator[RowAdapters]:
        """Within the block, row i of every batch uses adapter adapter_names[i] (None: base).
        A RowAdapters yielded by an earlier block may be passed again: layers then reuse what they
        derived from it (a decoder that routes the same rows at every step)."""
        rows = adapter_names if isinstance(adapter_names, RowAdapters) else RowAdapters.from_names(list(adapter_names))
        unknown = [n for n in rows.names if n not in self.configs]
        if unknown:
            raise ValueError(f"adapter_names has unknown adapters {unknown}; this model has {self.adapter_names}.")
        all_layers = self._all_delta_layers()
        refusal = self.mixed_batch_refusal(rows.names)
        if refusal is not None:
            raise ValueError(refusal)
        # Any merged adapter, named in the batch or not, is in the base weights every row reads.
        merged = sorted({n for layer in all_layers for n in layer.merged_adapters})
        if merged:
            raise RuntimeError(f"Adapters {merged} are merged into the base; unmerge() before a mixed batch.")
        # Adapters no row names stay out of the call: layers that cannot route rows are switched off.
        switched_off = [layer for layer in all_layers if not layer.supports_mixed_batch and not layer.disabled]
        for layer in all_layers:
            layer.__dict__["row_adapters"] = rows  # a plain attribute: skips Module.__setattr__, per layer per call
        for layer in switched_off:
            layer.disabled = True
        try:
            yield rows
        finally:
            for layer in all_layers:
                layer.__dict__["row_adapters"] = None
            for layer in switched_off:
                layer.disabled = False
            for group in self.__dict__.get("_input_groups") or ():
                group.clear()

    def _all_delta_layers(self) -> list[DeltaLayer]:
        # A forward with adapter_names pays this on every call: the walk of the module tree
        # (thousands of modules on a 1B model) is kept until the tree changes (_refresh_fused).
        layers = self.__dict__.get("_mixed_batch_layers")
        if layers is None:
            layers = self.__dict__["_mixed_batch_layers"] = [layer for _, layer in self.delta_layers()]
            self.__dict__["_input_groups"] = self._link_input_siblings(layers)
        return layers

    def _link_input_siblings(self, layers: list[DeltaLayer]) -> list[InputGroup]:
        """Tell the layers that the model calls on one input in turn (hf_compat's table) of each other."""
        for layer in layers:
            layer.__dict__.pop("input_group", None)
        modules = dict(self.model.named_modules())
        groups = []
        for names in hf_compat.shared_input_siblings(self.model):
            members = [modules[name] for name in names if isinstance(modules.get(name), DeltaLayer)]
            if len(members) > 1:
                groups.append(InputGroup(members))
                for member in members:
                    member.__dict__["input_group"] = groups[-1]
        return groups

    def mixed_batch_stacks(self) -> tuple:
        """Each layer's stacked adapters of its latest mixed batch (None where it has none). A CUDA
        graph captured over a mixed batch reads these tensors: it stays valid while every layer
        holds the same objects (a layer restacks when its adapters' tensors change)."""
        return tuple(layer.mixed_batch_stacks() for layer in self._all_delta_layers())

    def mixed_batch_refusal(self, adapter_names: Iterable[str | None]) -> str | None:
        """None if these adapters can share a batch row by row, else why not (some method's layers
        cannot route rows)."""
        names = [n for n in dict.fromkeys(adapter_names) if n is not None and n != BASE_ROW]
        all_layers = self._all_delta_layers()
        refusing = [layer for layer in all_layers if not layer.supports_mixed_batch and set(names) & set(layer.adapter_names)]
        if not refusing:
            return None
        methods = sorted({self._method_of(layer, names) for layer in refusing})
        kinds = sorted({type(layer).__name__ for layer in refusing})
        return (f"Per-row adapters are not supported by {', '.join(methods)} ({', '.join(kinds)} layers); "
                f"run those adapters in separate batches with set_adapter().")

    def _method_of(self, layer: DeltaLayer, names: Sequence[str]) -> str:
        for name in names:
            if name in layer.adapter_names:
                return self.configs[name].method
        return type(layer).__name__

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """Checkpointing that works with a frozen base: non-reentrant, so no input needs grads.

        Takes what transformers passes under either name (Trainer calls this one with
        activation_checkpointing_kwargs, every_n_layers and offload); `options` go to the base."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or gradient_checkpointing_kwargs or {})}
        hf_compat.enable_checkpointing(self.model, kwargs, **options)
        if kwargs["use_reentrant"] and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """The name transformers < 5 and peft users call; the same as activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **options)

    # -- adapters -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_module_names(self, adapter_name: str, where: Callable[[DeltaLayer], bool] | None = None) -> list[str]:
        """The modules an adapter wraps (modules_to_save copies aside), by the names the user knows;
        `where` keeps only the layers it accepts."""
        return [self._user_path(path) for path, layer in self.delta_layers()
                if adapter_name in layer.adapter_names and not isinstance(layer, ModulesToSave)
                and (where is None or where(layer))]

    def delta_layers(self) -> Iterator[tuple[str, DeltaLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, DeltaLayer):
                yield name, module

    def add_adapter(self, adapter_name: str, config: AdapterConfig, activate: bool = False, **build_kwargs: Any) -> None:
        """Attach a new adapter; with activate=True it becomes the (only) active one."""
        if adapter_name in self.configs:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists ({self.configs[adapter_name].method}); "
                f"pick another name or delete_adapter({adapter_name!r}) first."
            )
        if not adapter_name or "." in adapter_name:
            raise ValueError(f"Adapter names must be non-empty and contain no '.', got {adapter_name!r}.")
        info = method_for_config(config)
        if info.needs_calibration_data and build_kwargs.get("calibration_data") is None and "saved_tensors" not in build_kwargs:
            raise ValueError(f"Method {info.name!r} needs calibration_data=<batches> to be built.")
        if config.base_model_name_or_path is None:
            name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            config = config.replace(base_model_name_or_path=name_or_path or None)
        heads = [h for h in hf_compat.task_heads(self.model, config.task_type) if h not in (config.modules_to_save or [])]
        if heads:  # a classification task's new head trains beside the adapter, as in peft
            config = config.replace(modules_to_save=[*(config.modules_to_save or []), *heads])
        info.attach(self.model, config, adapter_name, **build_kwargs)
        if info.resolve_targets is not None:
            config = info.resolve_targets(self, adapter_name, config)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, list(config.modules_to_save), adapter_name)
        # New modules start in training mode; follow the mode of the layer they were added to.
        for _, layer in self.delta_layers():
            layer.train(layer.get_base_layer().training)
        self.configs[adapter_name] = config
        # Re-announce the active set so the new layers know it; a first adapter becomes active.
        self.set_adapter(adapter_name if activate or not self.active_adapters else self.active_adapters)
        self._refresh_fused()

    # -- the fused training path (kernels/patch.py) ------------------------------------------------
    def set_fused(self, fused: bool | str) -> None:
        """Choose the fused training path: True (always), False (never) or "auto" (on CUDA, when an
        adapter's method gains from it: LoRA, QLoRA). It patches this model's own modules only and
        is undone by fused=False, merge_and_unload(), unwrap() and deleting the last adapter."""
        self.fused = _check_fused(fused, self.model)
        self._refresh_fused()

    @property
    def is_fused(self) -> bool:
        """Whether this model's blocks run the fused training path now."""
        return is_patched(self.model)

    def _wants_fused(self) -> bool:
        if self.fused is False or not self.configs:
            return False
        if self.fused is True:
            return True
        gains = any(method_for_config(config).fused_kernels for config in self.configs.values())
        return gains and any(p.is_cuda for p in self.model.parameters())

    def _refresh_fused(self) -> None:
        # Every change of the module tree (add, delete, unload) and of the device comes through here.
        self.__dict__["_mixed_batch_layers"] = None
        wanted = self._wants_fused()
        if wanted and not is_patched(self.model):
            patch_model_for_training(self.model)
        elif not wanted and is_patched(self.model):
            unpatch_model(self.model)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DeltaModel:
        # .to() / .cuda() / .cpu(): fused="auto" follows the device.
        result = super()._apply(fn, *args, **kwargs)
        if "configs" in self.__dict__:
            self._refresh_fused()
        return result

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make these adapters active (several are summed); they alone are trainable."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.configs]
        if missing:
            raise ValueError(f"No adapter named {missing}; this model has {self.adapter_names}.")
        self.active_adapters = names
        for _, layer in self.delta_layers():
            layer.set_active(names)
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        trainable = {id(p) for name in self.active_adapters if not self.configs[name].inference_mode for p in self._adapter_params(name)}
        for param in self.model.parameters():
            param.requires_grad_(id(param) in trainable)

    def _adapter_params(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for _, layer in self.delta_layers():
            yield from layer.adapter_parameters(adapter_name)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the plain base model inside this block (merged adapters stay merged)."""
        layers = [layer for _, layer in self.delta_layers()]
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous):
                layer.disabled = was

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has {self.adapter_names}.")
        refusals = sorted({reason for _, layer in self.delta_layers() if adapter_name in layer.adapter_names
                           and (reason := layer.delete_refusal(adapter_name))})
        if refusals:
            raise RuntimeError(" ".join(refusals))
        # Innermost first, so the path of an outer wrapper stays valid while inner ones go.
        for name, layer in reversed(list(self.delta_layers())):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                set_submodule(self.model, name, layer.base_layer)
        del self.configs[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self.set_adapter(self.active_adapters)
        self._refresh_fused()

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination: str = "svd",
        *,
        rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int | None = None,
    ) -> Any:
        """Add `adapter_name`, a new inactive adapter combining `adapters` with `weights`, by their
        method's combine hook (MethodInfo.combine). For LoRA: combination "linear", "cat", "svd",
        "ties", "dare_linear" or "dare_ties" (deltatune.methods.lora.combine); returns a report of
        the new adapter's per-layer approximation error."""
        names = [adapters] if isinstance(adapters, str) else list(adapters or [])
        named = [method_for_config(self.configs[n]) for n in names if n in self.configs]
        # The named adapters' method decides; with none known, a combining method reports what is wrong.
        candidates = [info for info in named if info.combine is not None] or combining_methods()
        if not candidates:
            raise TypeError("No registered method combines adapters.")
        return candidates[0].combine(
            self, adapters, weights, adapter_name, combination,
            rank=rank, density=density, majority_sign_method=majority_sign_method, seed=seed,
        )

    # -- training hooks (methods declare them in their MethodInfo) ---------------------------
    def _training_adapters(self) -> Iterator[tuple[str, AdapterConfig]]:
        for name in self.active_adapters:
            if not self.configs[name].inference_mode:
                yield name, self.configs[name]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The sum of the active adapters' extra loss terms, or None if no method has one."""
        terms = []
        for name, config in self._training_adapters():
            hook = method_for_config(config).auxiliary_loss
            if hook is not None:
                terms.append(hook(self, name, config))
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """Let methods that adapt during training (e.g. AdaLoRA's rank budget) do so."""
        for name, config in self._training_adapters():
            hook = method_for_config(config).after_step
            if hook is not None:
                hook(self, name, config, step)

    # -- merging --------------------------------------------------------------------------
    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters into the base weights (zero added latency); `unmerge` undoes it."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"No adapter named {unknown} to merge; this model has {self.adapter_names}.")
        if self._sharded():
            refused = [n for n in names if not method_for_config(self.configs[n]).merges_sharded]
            if refused:
                raise distributed.DistributedError(
                    f"Adapters {refused} ({', '.join(sorted({self.configs[n].method for n in refused}))}) cannot be "
                    f"merged into sharded (FSDP2) weights. {_MERGE_IN_ONE_PROCESS}")
        for name in names:
            if not method_for_config(self.configs[name]).mergeable:
                raise TypeError(
                    f"Adapter {name!r} ({self.configs[name].method}) cannot be merged into the base weights; "
                    f"it runs beside the base layers. Keep it unmerged."
                )
        # Innermost wrappers first: an outer multiplicative delta must scale the inner merged weight.
        for _, layer in reversed(list(self.delta_layers())):
            layer.merge(names)

    def unmerge(self) -> None:
        for _, layer in self.delta_layers():
            layer.unmerge()

    def _sharded(self) -> bool:
        return any(distributed.is_sharded(p) for p in self.parameters())

    def merge_and_unload(self, adapter_names: Iterable[str] | None = None) -> nn.Module | None:
        """Merge, then return the plain base model with every deltatune module removed.

        Under FSDP2 every rank calls it: rank 0 gets a merged plain copy on its CPU (None elsewhere)
        and the sharded model is left as it was (see _merged_copy_of_sharded)."""
        if self._sharded():
            return self._merged_copy_of_sharded(adapter_names)
        self.merge(adapter_names)
        for name, layer in reversed(list(self.delta_layers())):
            set_submodule(self.model, name, layer.base_layer)
        self.configs.clear()
        self.active_adapters = []
        self._refresh_fused()
        return self.model

    def _merged_copy_of_sharded(self, adapter_names: Iterable[str] | None) -> nn.Module | None:
        # FSDP2's root hooks live on this wrapper, so its inner model cannot be handed back. Instead the
        # base weights and the adapters are gathered to rank 0, which builds the model afresh from its
        # config and merges there exactly as one process would (same files, same merge code); the
        # shards are not touched, so training can go on.
        import tempfile

        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        unknown = [name for name in names if name not in self.configs]
        if unknown:
            raise ValueError(f"No adapter named {unknown}; this model has {self.adapter_names}.")
        folded = sorted({name for _, layer in self.delta_layers() for name in layer.merged_adapters})
        if folded:  # their deltas are in the gathered base weights already: they would be added twice
            raise distributed.DistributedError(
                f"Adapters {folded} are merged into the sharded weights; unmerge() them (every rank) before "
                "merge_and_unload(), which merges a copy on rank 0.")
        plain_class = distributed.unsharded_class(self.model)
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(plain_class, "config_class"):
            raise distributed.DistributedError(
                f"merge_and_unload() under FSDP2 rebuilds the model from its transformers config, and "
                f"{plain_class.__name__} has none. {_MERGE_IN_ONE_PROCESS}")
        base_state = distributed.gather_state_dict(self.model)
        with tempfile.TemporaryDirectory() as folder:
            for name in names:
                self.save(Path(folder) / name, adapter_name=name)  # gathers; rank 0 writes
            if not distributed.is_main():
                return None
            with torch.device("cpu"):
                plain = plain_class(config)
            plain.load_state_dict(_base_weights(base_state, plain), strict=True)
            merged = DeltaModel(plain, fused=False)
            for name in names:
                merged.load_adapter(Path(folder) / name, name)
            return merged.merge_and_unload(names)

    def unwrap(self) -> nn.Module:
        """Remove every adapter without merging and return the base model as it was wrapped:
        its own modules, classes and hooks (parameters stay frozen)."""
        self.unmerge()
        for name in list(self.configs):
            self.delete_adapter(name)
        self._refresh_fused()
        return self.model

    # -- reports --------------------------------------------------------------------------
    def trainable_parameters(self) -> ParameterReport:
        by_method: dict[str, int] = {}
        owner: dict[int, str] = {}
        for _, layer in self.delta_layers():  # one walk of the module tree, not one per adapter
            for adapter, config in self.configs.items():
                label = "modules_to_save" if type(layer) is ModulesToSave else config.method
                for p in layer.adapter_parameters(adapter):
                    owner.setdefault(id(p), label)
        trainable = total = nbytes = 0
        for param in self.parameters():
            if not param.is_floating_point():
                continue  # packed 4-bit codes made parameters for sharding: counted below
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
                nbytes += param.numel() * param.element_size()
                label = owner.get(id(param), "other")
                by_method[label] = by_method.get(label, 0) + param.numel()
        total += packed_parameter_count(self.model)  # 4-bit base weights live in buffers
        # Copies trained for modules_to_save stand in for their originals: count the model once.
        total -= sum(p.numel() for _, l in self.delta_layers() if isinstance(l, ModulesToSave) for a in l.adapter_names for p in l.adapter_parameters(a))
        return ParameterReport(trainable=trainable, total=total, trainable_bytes=nbytes, by_method=by_method)

    # -- files ----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors under the keys of the saved file (peft's naming). Sharded (FSDP2)
        tensors come back whole: under a process group every process must call this."""
        adapter_name = self._one_adapter(adapter_name)
        state: dict[str, torch.Tensor] = {}
        for path, layer in self.delta_layers():
            if adapter_name in layer.adapter_names:
                for key, tensor in layer.adapter_state_dict(adapter_name).items():
                    whole = distributed.gather_full(tensor)
                    state[f"{KEY_PREFIX}{self._user_path(path)}.{key}"] = whole.detach() if whole is not tensor else tensor
        return state

    def _user_path(self, path: str) -> str:
        """A layer's path without the `base_layer` hops of wrappers around it (hybrids), so an
        adapter's keys do not depend on which other methods were added before it."""
        module, kept = self.model, []
        for part in path.split("."):
            if not (isinstance(module, DeltaLayer) and part == "base_layer"):
                kept.append(part)
            module = getattr(module, part)
        return ".".join(kept)

    def save(self, directory: str | Path, adapter_name: str | None = None, *, task: str | None = None,
             metrics: dict[str, Any] | None = None) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (the adapter only, never the base),
        and a README.md model card: base model, method, targets, settings, parameter count, and the
        task and metrics when given. Under a process group (DDP, FSDP2) every process calls it: the
        adapter is gathered whole, rank 0 writes the files a single process writes, all return after."""
        adapter_name = self._one_adapter(adapter_name)
        config = self.configs[adapter_name].replace(inference_mode=True)
        tensors = self.adapter_state_dict(adapter_name)
        if not distributed.is_main():
            distributed.barrier()
            return Path(directory)
        card = _model_card(adapter_name, config, sum(t.numel() for t in tensors.values()),
                           self.trainable_parameters().total, task, metrics)
        try:
            return save_adapter_files(directory, config, tensors, model_card=card)
        finally:
            distributed.barrier()

    # -- state dict: the delta, not the frozen base ------------------------------------------------
    def _is_delta_key(self) -> Callable[[str], bool]:
        """Whether a state-dict key (relative to this wrapper) is the wrapper's own: adapter tensors
        of any layer (not its wrapped base) and any parameter that trains."""
        owned = [f"model.{path}." for path, _ in self.delta_layers()]
        trainable = {f"model.{name}" for name, param in self.model.named_parameters() if param.requires_grad}
        return lambda key: key in trainable or any(key.startswith(o) and not key.startswith(o + "base_layer.") for o in owned)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The delta only: every adapter's tensors (modules_to_save copies included) and whatever
        trains. The frozen base is the base model's own state (`get_base_model().state_dict()`;
        `merge_and_unload().state_dict()` for a merged model). So a training framework that saves
        `model.state_dict()` (Hugging Face Trainer, accelerate) writes adapter-sized checkpoints."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        is_delta = self._is_delta_key()
        for key in [k for k in state if k.startswith(prefix) and not is_delta(k[len(prefix):])]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Loads a delta state (see state_dict); base keys, where present, load into the base too.
        strict: every delta key must be there and none unknown (missing base keys are fine)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        is_delta = self._is_delta_key()
        missing = [key for key in result.missing_keys if is_delta(key)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"The state dict does not fit this {type(self).__name__}: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)."
            )
        return type(result)(missing, result.unexpected_keys)

    # -- the names peft users reach for: aliases of the calls above, not a second API ---------------
    def save_pretrained(self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None,
                        **_ignored: Any) -> None:
        """peft's layout: the "default" adapter in `save_directory`, every other one in a sub-folder
        of its name. Only adapters are written, never the base model. (Keyword arguments that
        Hugging Face tools pass for whole models, such as safe_serialization, change nothing.)"""
        names = list(selected_adapters) if selected_adapters is not None else self.adapter_names
        for name in names:
            self.save(Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name, name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, **_ignored: Any) -> DeltaModel:
        """peft's PeftModel.from_pretrained(base, folder): the same as dt.load(base, folder)."""
        return load(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.configs

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        return self.disable_adapters()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        report = self.trainable_parameters()
        return report.trainable, report.total

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters())

    def load_adapter(self, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                     activate: bool = True, dtype: torch.dtype | None = None) -> None:
        """Add an adapter from a folder written by deltatune or Hugging Face peft.

        dtype: hold the adapter's floating-point weights in this dtype (default: float32 over a
        bf16/fp16 base, as for training). A server passes the base's dtype: its mixed batches then
        add every row's adapter product in that dtype, in place (the fused kernels need one dtype)."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (torch.bfloat16, ...), got {dtype!r}.")
        config, tensors = _read_folder(directory)
        self._add_loaded(adapter_name, config.replace(inference_mode=not is_trainable), tensors, directory, activate, dtype)

    def _add_loaded(self, adapter_name: str, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                    directory: str | Path, activate: bool, dtype: torch.dtype | None = None) -> None:
        # The file's tensors let a method skip data-dependent setup (a Fisher mask, a prompt from text).
        self.add_adapter(adapter_name, config, activate=activate, saved_tensors=tensors)
        try:
            self._copy_in(adapter_name, tensors, directory)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if dtype is not None:
            with torch.no_grad():
                for param in self._adapter_params(adapter_name):
                    if param.is_floating_point():
                        param.data = param.data.to(dtype)  # a new storage: stacked copies are rebuilt

    def _adapter_dtype(self, adapter_name: str) -> torch.dtype | None:
        """The dtype of the adapter's floating-point weights (None if it has none)."""
        return next((p.dtype for p in self._adapter_params(adapter_name) if p.is_floating_point()), None)

    def replace_adapter(self, directory: str | Path, adapter_name: str) -> str:
        """Swap the weights of adapter `adapter_name` for those in `directory` on a live model.

        When the new adapter has the same method, targets and shapes (the usual case: a retrained
        version), its tensors are copied into the existing parameters in place: nothing is
        reallocated and a torch.compile'd model does not recompile. Returns "in_place". Otherwise
        the old adapter is deleted and the new one loaded under the same name, keeping whether it
        was active: returns "rebuilt". The folder is read and checked before anything changes, so
        a bad file leaves the current adapter serving.
        """
        if adapter_name not in self.configs:
            raise ValueError(f"No adapter named {adapter_name!r} to replace; this model has {self.adapter_names}. Use load_adapter().")
        if any(adapter_name in layer.merged_adapters for _, layer in self.delta_layers()):
            raise RuntimeError(f"Adapter {adapter_name!r} is merged into the base; unmerge() before replacing it.")
        old = self.configs[adapter_name]
        new, tensors = _read_folder(directory)  # config and weights of one save, read as one unit
        new = new.replace(inference_mode=old.inference_mode)
        if _same_structure(old, new):
            self._copy_in(adapter_name, tensors, directory)  # checks every shape before the first write
            self.configs[adapter_name] = new.replace(base_model_name_or_path=old.base_model_name_or_path)
            return "in_place"
        was_active = adapter_name in self.active_adapters
        dtype = self._adapter_dtype(adapter_name)  # the new version is held as the old one was
        self.delete_adapter(adapter_name)
        self._add_loaded(adapter_name, new, tensors, directory, activate=False, dtype=dtype)
        others = [n for n in self.active_adapters if n != adapter_name]
        self.set_adapter([*others, adapter_name] if was_active else others)
        return "rebuilt"

    def _copy_in(self, adapter_name: str, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterFileError(
                f"Adapter in {directory} does not fit this model: "
                + (f"missing {len(missing)} tensor(s), e.g. {missing[:3]}; " if missing else "")
                + (f"{len(unexpected)} tensor(s) with no place in this model, e.g. {unexpected[:3]}. " if unexpected else "")
                + "Was it trained on another base model or with other target_modules?"
            )
        for key, target in expected.items():
            check_tensor_fits(key, tensors[key], target, directory)
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])

    def _one_adapter(self, adapter_name: str | None) -> str:
        if adapter_name is not None:
            if adapter_name not in self.configs:
                raise ValueError(f"No adapter named {adapter_name!r}; this model has {self.adapter_names}.")
            return adapter_name
        if not self.configs:
            raise ValueError("This model has no adapter.")
        return self.active_adapters[0] if self.active_adapters else next(iter(self.configs))


def _model_card(adapter_name: str, config: AdapterConfig, parameters: int, base_parameters: int,
                task: str | None, metrics: dict[str, Any] | None) -> str:
    """A README.md for an adapter folder, in the Hub's model-card form (YAML front matter)."""
    base = config.base_model_name_or_path
    targets = config.target_modules
    if isinstance(targets, list):
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        targets_text = f"{len(targets)} modules ({', '.join(leaves)})"
    else:
        targets_text = "the method's own" if targets is None else f"`{targets}`"
    # The method's own fields (rank, scaling, ...) and the shared ones the user set.
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    settings = {k: v for k, v in config.to_dict().items()
                if k in {f.name for f in dataclasses.fields(config)} and k not in ("target_modules", "base_model_name_or_path",
                "inference_mode", "revision") and (k not in shared or v not in (None, [], {}, False))}
    lines = ["---", "library_name: deltatune", *([f"base_model: {base}"] if base else []),
             f"tags: [deltatune, peft, {config.method}]", "---", "",
             f"# {adapter_name}: a {config.method} adapter", "",
             "| | |", "|---|---|",
             f"| method | {config.method} (peft_type {config.peft_type or config.method.upper()}) |",
             f"| base model | {base or 'not recorded'} |",
             f"| targets | {targets_text} |",
             f"| settings | {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'} |",
             f"| trainable parameters | {parameters:,} ({100 * parameters / max(base_parameters, 1):.4f}% of {base_parameters:,}) |"]
    if task:
        lines.append(f"| task | {task} |")
    for name, value in (metrics or {}).items():
        lines.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    lines += ["", "Load it with `deltatune.load(base_model, folder)` or peft's "
              "`PeftModel.from_pretrained(base_model, folder)` (LoRA, IA3, AdaLoRA, prompt-style methods).", ""]
    return "\n".join(lines)


def written_out_targets(model: DeltaModel, adapter_name: str, config: AdapterConfig) -> AdapterConfig:
    """`config` with target_modules written out as the modules the adapter wraps, where it named
    them by the architecture's default (None) or "all-linear" (a MethodInfo.resolve_targets)."""
    if config.target_modules is None or config.target_modules == "all-linear":
        return config.replace(target_modules=model.adapter_module_names(adapter_name))
    return config


def wrap(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER,
         fused: bool | str | None = None, **build_kwargs: Any) -> DeltaModel:
    """Freeze `model` and attach an adapter described by `config`; returns the wrapper.

    Wrapping a DeltaModel adds the adapter to it and activates it beside the active ones
    (a hybrid, e.g. LoRA + BitFit). fused: the fused training path, "auto" (the default for a
    new wrapper), True or False (see DeltaModel.set_fused); None keeps a wrapper's choice.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a deltatune config such as dt.LoraConfig(...), got {type(config).__name__}.")
    if isinstance(model, DeltaModel):
        model.add_adapter(adapter_name, config, **build_kwargs)
        model.set_adapter([*model.active_adapters, adapter_name])
        if fused is not None:
            model.set_fused(fused)
        return model
    return DeltaModel(model, config, adapter_name, fused="auto" if fused is None else fused, **build_kwargs)


def load(model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
         fused: bool | str | None = None) -> DeltaModel:
    """Wrap `model` with the adapter saved in `directory` (by deltatune or peft), active.
    fused as in wrap()."""
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model, fused="auto" if fused is None else fused)
    wrapped.load_adapter(directory, adapter_name, is_trainable=is_trainable)
    if fused is not None and wrapped.fused is not fused:
        wrapped.set_fused(fused)
    return wrapped
