"""Train one method on a task and save it; evaluate a saved adapter (`deltatune train` / `eval`).

The run's description (task, method settings, training config, final metrics) is written beside
the adapter as deltatune_run.json, so `evaluate_saved` knows which task and base to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from .measure import count_parameters, directory_bytes, save_full_checkpoint, steady_step_time, tied_duplicate_names
from .methods import apply_method, method_settings, validate_methods
from .presets import FULL
from .runner import prepare_output_dir

RUN_FILE = "deltatune_run.json"
SPEC_KEYS = (
    "task", "task_options", "method", "method_options", "lr", "train", "output", "train_limit", "eval_limit", "evaluate",
    "quantize",
)


@dataclass
class TrainSpec:
    """One training job, as `deltatune train` reads it from flags and/or a YAML file."""

    task: Any = "sentiment"  # a task name or a Task object
    method: str = "lora"
    output: str = "runs/train"
    task_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    train_limit: int | None = None
    eval_limit: int | None = None
    evaluate: bool = True
    quantize: str | None = None  # "nf4", "fp4" or "int4": the frozen base in 4 bits

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the job spec") -> "TrainSpec":
        unknown = sorted(set(values) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"Unknown key(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(SPEC_KEYS)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainSpec":
        import yaml

        text = Path(path).read_text()
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of keys ({', '.join(SPEC_KEYS)}), not {type(values).__name__}.")
        return cls.from_dict(values, source=str(path))

    def merged(self, **overrides: Any) -> "TrainSpec":
        """A copy with every override that is not None applied (dicts are merged key by key)."""
        # Not dataclasses.asdict: it would deep-copy a Task object given as `task`.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        return TrainSpec(**values)


def _train_config(spec: TrainSpec, lr: float) -> Any:
    from deltatune.train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(spec.train) - known)
    if unknown:
        raise ValueError(f"Unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}.")
    values = {"lr": lr, **spec.train}
    if (values.get("checkpoint_every") or values.get("resume")) and not values.get("output_dir"):
        values["output_dir"] = str(Path(spec.output) / "checkpoints")  # beside the adapter, unless chosen
    if values.get("report_to") and not values.get("logging_dir"):
        values["logging_dir"] = str(Path(spec.output) / "logs")
    return TrainConfig(**values)


def train_method(
    spec: TrainSpec,
    *,
    progress: bool = True,
    console: Callable[[str], None] | None = print,
    eval_splits: Sequence[str] | None = None,
    quality_every: int = 0,
    on_quality: Callable[[int, dict[str, Any]], None] | None = None,
    measure_memory: bool = False,
) -> dict[str, Any]:
    """Train `spec.method` on `spec.task`, save it to `spec.output`, and return the run summary.

    eval_splits: the splits evaluated (default: all of the task's). With `on_quality`, those splits
    are also evaluated every `quality_every` optimizer steps before the last and handed to it as
    (step, results); it may raise to stop the run (a search pruning a weak trial). measure_memory:
    one accounted training step on the first batch before training (its bytes by kind, as
    `compare` measures them) goes into the summary as "memory".
    """
    from deltatune.train import evaluate_task, get_task, train
    from deltatune.train import seed_everything

    from deltatune import distributed

    if distributed.launched() and spec.train.get("distributed", "auto") != "none":
        distributed.init_from_env()  # before anything is written: only rank 0 writes and prints
    if not distributed.is_main():
        console = None
    (method,) = validate_methods([spec.method])
    settings = method_settings(method, spec.method_options, spec.lr, quantize=spec.quantize)
    config = _train_config(spec, settings.lr)
    config.progress = progress
    output = prepare_output_dir(spec.output)
    task = get_task(spec.task, **spec.task_options) if isinstance(spec.task, str) else spec.task
    seed_everything(config.seed)
    base, tokenizer = task.load_model()
    data = task.train_data(tokenizer, limit=spec.train_limit)
    model = apply_method(base, settings, task.head_modules, _first_batches(task, data, config.batch_size))
    trainable, total = count_parameters(model)
    if console:
        console(f"Training {method} on {task.name}: {trainable:,} of {total:,} parameters trainable, lr {config.lr:g}")
    memory = _one_step_memory(model, task, data, config) if measure_memory else None

    def report_quality(step: int, model: nn.Module, optimizer: Any) -> None:
        if on_quality and quality_every and step % quality_every == 0 and step < config.max_steps:
            on_quality(step, evaluate_task(task, model, tokenizer, splits=eval_splits, limit=spec.eval_limit))

    result = train(model, data, config, collate_fn=task.collate, step_callbacks=[report_quality])
    quality = evaluate_task(task, model, tokenizer, splits=eval_splits, limit=spec.eval_limit) if spec.evaluate else None
    saved_bytes = _save_trained(model, method, output, task.name, quality)
    summary: dict[str, Any] = {
        "task": spec.task if isinstance(spec.task, str) else task.name,
        # Absolute paths, so that `deltatune eval` finds the model and data from any folder.
        "task_options": _absolute_paths(spec.task_options),
        "method": method,
        "method_settings": settings.to_dict(),
        "quantize": settings.quantize,
        "train_config": dataclasses.asdict(config),
        "parameters": {"trainable": trainable, "total": total},
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "step_s": steady_step_time(result.step_times),
        "train_s": result.total_time,
        "saved_bytes": saved_bytes,
    }
    if quality is not None:
        summary["quality"] = quality
    if memory is not None:
        summary["memory"] = memory
    if distributed.is_main():
        (output / RUN_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if console:
        console(f"Saved to {output} ({saved_bytes:,} bytes)")
    return summary


def _one_step_memory(model: nn.Module, task: Any, data: Any, config: Any) -> dict[str, Any]:
    """One training step's bytes by kind (lr 0: the weights stay as they are; see compare)."""
    from deltatune.train import seed_everything

    from .measure import measure_training_step

    breakdown = measure_training_step(model, next(_first_batches(task, data, config.batch_size, count=1)),
                                      device=config.device, mixed_precision=config.mixed_precision)
    seed_everything(config.seed)  # the probe's dropout draws leave the training run's as they were
    return breakdown.to_dict()


def _first_batches(task: Any, data: Any, batch_size: int, count: int = 16):
    for start in range(0, min(len(data), count * batch_size), batch_size):
        yield task.collate([data[i] for i in range(start, min(start + batch_size, len(data)))])


def _absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Option values naming an existing file or folder, made absolute."""
    return {key: str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value
            for key, value in options.items()}


def _save_trained(model: nn.Module, method: str, output: Path, task: str, quality: dict[str, Any] | None) -> int:
    if method == FULL:
        save_full_model(model, output)
        return directory_bytes(output / "model.safetensors")
    from deltatune.train.reporting import numeric_leaves

    model.save(output, task=task, metrics=numeric_leaves(quality or {}, sep="."))
    return sum(directory_bytes(output / name) for name in ("adapter_config.json", "adapter_model.safetensors") if (output / name).exists())


def save_full_model(model: nn.Module, output: Path) -> None:
    """The whole fine-tuned model; under a process group gathered whole and written by rank 0."""
    from deltatune import distributed

    if not distributed.is_initialized():
        save_full_checkpoint(model, output)
        return
    if any(distributed.is_sharded(p) for p in model.parameters()):
        from safetensors.torch import save_file

        state = distributed.gather_state_dict(model)
        if distributed.is_main():
            output.mkdir(parents=True, exist_ok=True)
            temporary = output / "model.safetensors.tmp"
            tied = tied_duplicate_names(model)  # a tied embedding is stored once, as one process stores it
            tensors = {k: v.contiguous().clone() for k, v in state.items() if k not in tied}
            save_file(tensors, str(temporary), metadata=tied or None)
            os.replace(temporary, output / "model.safetensors")
    elif distributed.is_main():
        save_full_checkpoint(model, output)
    distributed.barrier()


def load_saved(directory: str | os.PathLike, task: Any, quantize: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the task's base with the adapter (or full weights) saved in `directory`.

    quantize: the 4-bit type the adapter was trained over; the base is quantized the same way first,
    so the adapter is evaluated on the base it learned to correct.
    """
    import deltatune

    directory = Path(directory)
    base, tokenizer = task.load_model()
    if quantize:
        from deltatune.quant import quantize as quantize_model

        quantize_model(base, quantize, exclude_modules=list(task.head_modules) or None)
    if (directory / "adapter_config.json").is_file():
        return deltatune.load(base, directory), tokenizer
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_model

        load_model(base, str(directory / "model.safetensors"))
        return base, tokenizer
    raise FileNotFoundError(
        f"{directory} holds neither adapter_config.json (an adapter) nor model.safetensors (a full model); "
        f"point to a folder written by `deltatune train`."
    )


def evaluate_saved(
    directory: str | os.PathLike,
    task: Any = None,
    *,
    splits: list[str] | None = None,
    limit: int | None = None,
    task_options: dict[str, Any] | None = None,
) -> dict[str, dict]:
    """Evaluate a folder written by `train_method` (or any adapter) on its task's splits."""
    from deltatune.train import evaluate_task, get_task

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No such folder: {directory}")
    run_file = directory / RUN_FILE
    saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
    task_name = task or saved.get("task")
    if not task_name:
        raise ValueError(f"{directory} has no {RUN_FILE}; name the task it was trained on (--task).")
    options = task_options if task_options is not None else saved.get("task_options", {})
    task_object = get_task(task_name, **options) if isinstance(task_name, str) else task_name
    model, tokenizer = load_saved(directory, task_object, quantize=saved.get("quantize"))
    return evaluate_task(task_object, model, tokenizer, splits=splits, limit=limit)
