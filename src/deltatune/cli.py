"""The `deltatune` command: a thin argparse layer over functions a Python user can call.

Each subcommand is one entry in SUBCOMMANDS (name, help, add_arguments, run); a later
subcommand (inspect, serve, ...) is one more entry. `run` returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- shared parsing helpers
def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 8 -> int, 1e-3 -> float, true -> bool, [a,b] -> list."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _key_values(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {pair!r}.")
        values[key.strip()] = _parse_value(value)
    return values


def _number_or_text(value: Any) -> Any:
    """"1e-3" as 0.001 (YAML reads exponents without a dot as text), other text as it is."""
    try:
        return float(value) if isinstance(value, str) and value != "auto" else value
    except ValueError:
        return value


def _method_values(pairs: Sequence[str] | None, what: str) -> dict[str, dict[str, Any]]:
    """--set lora.r=4 -> {"lora": {"r": 4}}; --lr lora=1e-3 -> {"lora": 1e-3} (via _key_values)."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in _key_values(pairs, what).items():
        method, dot, field = key.partition(".")
        if not dot:
            raise ValueError(f"{what} must look like METHOD.FIELD=VALUE (e.g. lora.r=4), got {key!r}.")
        nested.setdefault(method.lower(), {})[field] = value
    return nested


# ---------------------------------------------------------------- compare
def _add_report_to(parser: argparse.ArgumentParser) -> None:
    from deltatune.train.reporting import REPORT_TARGETS

    parser.add_argument("--report-to", type=_csv, metavar="TARGETS",
                        help=f"comma-separated: {', '.join(REPORT_TARGETS)} (training scalars under the output's logs/)")


def _add_compare(parser: argparse.ArgumentParser) -> None:
    _add_report_to(parser)
    parser.add_argument("--task", default="sentiment", help="task name (default: sentiment)")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="option passed to the task (repeatable)")
    parser.add_argument("--methods", type=_csv, help="comma-separated methods, e.g. full,lora,bitfit, or 'all' (default: the preset's)")
    parser.add_argument("--quick", action="store_true", help="the short preset: under 5 minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default: the preset's)")
    parser.add_argument("--train-limit", type=int, help="training examples to read")
    parser.add_argument("--eval-limit", type=int, help="examples per evaluation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every method N times (seeds SEED..SEED+N-1): quality as mean ± std, error bars")
    parser.add_argument("--curve-points", type=int, default=2,
                        help="in-domain quality and forgetting evaluated N times during training, for forgetting at "
                             "matched quality (0: none)")
    parser.add_argument("--lr", action="append", metavar="METHOD=LR",
                        help="learning rate of one method (repeatable); METHOD=auto or plain 'auto' (every method): "
                             "from a learning-rate range test just before training")
    parser.add_argument("--set", action="append", metavar="METHOD.FIELD=VALUE", help="a method config field, e.g. lora.r=8")
    parser.add_argument("--output", help="output folder (default: runs/compare-<time>)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--storage-tasks", type=int, default=100, help="N in the storage-for-N-tasks plot")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the full model copy written to measure its size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars; the loss is logged every log_every steps instead")
    parser.add_argument("--distributed", choices=["auto", "ddp", "fsdp2", "none"], default="auto",
                        help="under torchrun: each method trains over the processes with DDP, FSDP2 or auto (DDP unless "
                        "the weights crowd a GPU); --batch-size is the global batch; rank 0 writes. none: refused under "
                        "torchrun")
    _add_quantize(parser, "every PEFT method's frozen base (full fine-tuning stays the full-precision baseline)")


def _add_quantize(parser: argparse.ArgumentParser, what: str) -> None:
    from deltatune.quant import QUANT_TYPES

    parser.add_argument("--quantize", choices=QUANT_TYPES, help=f"store {what} in 4 bits (nf4 is QLoRA's type)")


def _run_compare(args: argparse.Namespace) -> int:
    from deltatune.compare import compare

    given = list(args.lr or [])
    lrs: dict[str, float | str] = {"*": "auto"} if "auto" in given else {}
    for key, value in _key_values([g for g in given if g != "auto"], "--lr").items():
        lrs[key.lower()] = _number_or_text(value)  # a number or "auto"; compare() names anything else
    run = compare(
        args.task,
        args.methods,
        quick=args.quick,
        output_dir=args.output,
        max_steps=args.steps,
        batch_size=args.batch_size,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        seed=args.seed,
        seeds=args.seeds,
        curve_points=args.curve_points,
        lrs=lrs,
        method_options=_method_values(args.set, "--set"),
        task_options=_key_values(args.task_option, "--task-option"),
        device=args.device,
        storage_tasks=args.storage_tasks,
        keep_checkpoints=args.keep_checkpoints,
        quantize=args.quantize,
        progress=not args.no_progress,
        report_to=args.report_to,
        distributed=args.distributed,
    )
    from deltatune import distributed

    failed = [n for n, r in run.methods.items() if r.get("status") != "ok"]
    if failed and distributed.is_main():
        print(f"Failed: {', '.join(failed)} (details in {run.output_dir / 'report.md'})", file=sys.stderr)
    distributed.shutdown()  # under torchrun: every rank leaves together, the comparison is over
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------- estimate
def _add_estimate(parser: argparse.ArgumentParser) -> None:
    from deltatune.compare.estimate import OPTIMIZERS, WEIGHT_DTYPES
    from deltatune.compare.presets import MODEL_PRESETS

    parser.add_argument("model", nargs="?", help=f"a model folder or a preset: {', '.join(MODEL_PRESETS)}")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    parser.add_argument("--methods", type=_csv, help="comma-separated methods (default: full and every registered one)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--task-kind", choices=["classification", "causal_lm"], help="default: from the model")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the device to predict for")
    parser.add_argument("--mixed-precision", default="auto", help="auto (bf16 on CUDA), no, bf16, fp16")
    parser.add_argument("--weights-dtype", choices=list(WEIGHT_DTYPES), default="float32",
                        help="how the base is stored: float32 (mixed precision's master weights) or a half-precision base")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block's activations in backward")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    parser.add_argument("--fsdp2-gpus", type=int, default=1, metavar="N",
                        help="predict one GPU of N under FSDP2 (--batch-size sequences per GPU)")
    parser.add_argument("--set", action="append", metavar="METHOD.FIELD=VALUE", help="a method config field, e.g. lora.r=16")
    parser.add_argument("--results", metavar="RESULTS_JSON", help="show a compare run's estimates against its measurements")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_estimate(args: argparse.Namespace) -> int:
    if args.results:
        from deltatune.compare.report import estimate_comparison_text, read_results

        print(estimate_comparison_text(read_results(args.results)))
        return EXIT_OK
    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError(f"Two models named: {args.model!r} and --model {args.model_option!r}; name one.")
    args.model = args.model or args.model_option
    if not args.model:
        raise ValueError("Name a model folder or preset to estimate (or pass --results RESULTS_JSON).")
    from deltatune.compare import estimate

    report = estimate(
        args.model,
        args.methods,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        task_kind=args.task_kind,
        num_labels=args.num_labels,
        method_options=_method_values(args.set, "--set"),
        device=args.device,
        mixed_precision=args.mixed_precision,
        weights_dtype=args.weights_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        fsdp2_gpus=args.fsdp2_gpus,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return EXIT_OK


# ---------------------------------------------------------------- train / eval
def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_report_to(parser)
    parser.add_argument("--config", help="YAML file with task, method, method_options, lr, train, output, ...")
    parser.add_argument("--task", help="task name (default: sentiment)")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="option passed to the task")
    parser.add_argument("--method", help="full or a registered method (default: lora)")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a method config field, e.g. r=8")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--train-option", action="append", metavar="KEY=VALUE", help="any TrainConfig field, e.g. schedule=cosine")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("--output", help="folder for the adapter (default: runs/train)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar; the loss is logged every log_every steps instead")
    parser.add_argument("--distributed", choices=["auto", "ddp", "fsdp2", "none"],
                        help="under torchrun: DDP, FSDP2, auto (DDP unless the weights crowd a GPU) or none; "
                        "--batch-size is the global batch")
    _add_quantize(parser, "the frozen base")


def _run_train(args: argparse.Namespace) -> int:
    from deltatune.compare.jobs import TrainSpec, train_method

    spec = TrainSpec.from_yaml(args.config) if args.config else TrainSpec()
    train_options = _key_values(args.train_option, "--train-option")
    for key, value in (("max_steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed),
                       ("report_to", args.report_to), ("distributed", args.distributed)):
        if value is not None:
            train_options[key] = value
    spec = spec.merged(
        task=args.task,
        task_options=_key_values(args.task_option, "--task-option") or None,
        method=args.method,
        method_options=_key_values(args.set, "--set") or None,
        lr=args.lr,
        train=train_options or None,
        output=args.output,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        evaluate=False if args.no_eval else None,
        quantize=args.quantize,
    )
    summary = train_method(spec, progress=not args.no_progress)
    from deltatune import distributed

    if "quality" in summary and distributed.is_main():
        print(json.dumps(summary["quality"], indent=2))
    distributed.shutdown()  # under torchrun: every rank leaves together, the run is over
    return EXIT_OK


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="folder written by `deltatune train` (or any adapter folder)")
    parser.add_argument("--task", help="task name (default: the one recorded in the folder)")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE")
    parser.add_argument("--splits", type=_csv, help="comma-separated splits (default: all)")
    parser.add_argument("--limit", type=int, help="examples per split")


def _run_eval(args: argparse.Namespace) -> int:
    from deltatune.compare.jobs import evaluate_saved

    options = _key_values(args.task_option, "--task-option") if args.task_option else None
    metrics = evaluate_saved(args.adapter, args.task, splits=args.splits, limit=args.limit, task_options=options)
    print(json.dumps(metrics, indent=2))
    return EXIT_OK


# ---------------------------------------------------------------- inspect
def _add_inspect(parser: argparse.ArgumentParser) -> None:
    from deltatune.inspection import BASE_DTYPES

    parser.add_argument("dirs", nargs="+", metavar="DIR", help="an adapter folder, or a folder whose subfolders are adapter folders")
    parser.add_argument("--tasks", type=int, help="N in the storage-for-N-tasks table (default: the number of adapters listed; 10 and 100 are always shown)")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--base", metavar="DIR", help="a local model folder whose *.safetensors size is the base size")
    base.add_argument("--base-params", type=int, metavar="COUNT", help="the base model's parameter count")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, help="dtype of --base-params (default: the adapters' dtype)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_inspect(args: argparse.Namespace) -> int:
    from deltatune.inspection import inspect_report, report_json

    report = inspect_report(args.dirs, tasks=args.tasks, base_dir=args.base, base_params=args.base_params, base_dtype=args.base_dtype)
    print(report_json(report) if args.json else report.render())
    # Listing works with broken folders in it, but a script should notice them.
    return EXIT_OK if all(a.ok for a in report.adapters) else EXIT_FAILED


# ---------------------------------------------------------------- serve
def _add_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="local causal LM folder (config, tokenizer, *.safetensors)")
    parser.add_argument("--adapters", required=True, metavar="ADAPTERS_DIR", help="folder of adapter folders; a request's adapter is a subfolder name")
    parser.add_argument("--host", default="127.0.0.1", help="beyond loopback, set an API key")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $DELTATUNE_API_KEY, else none)")
    parser.add_argument("--max-prompt-chars", type=int, default=100_000, help="longer prompts are answered 413")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-resident", type=int, default=4, help="adapters kept loaded at once (least recently used ones are unloaded)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded at once")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long the first request of an idle server waits for others")
    parser.add_argument("--batching", choices=["whole", "continuous"], default="whole",
                        help="whole: one generate() per gathered batch (CUDA-graph decode steps on a GPU); continuous: "
                             "requests join and leave the running decode between steps (CUDA-graph steps and prefills on a "
                             "GPU; where the model's cache allows it)")
    parser.add_argument("--context-tokens", type=int, default=2048,
                        help="continuous batching: cache columns per row; a prompt and its new tokens must fit")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default and upper bound of a request's max_new_tokens")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _run_serve(args: argparse.Namespace) -> int:
    import logging

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}.")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deltatune.serve import serve

    try:
        serve(
            args.base, args.adapters, host=args.host, port=args.port, device=args.device, log_level=args.log_level,
            max_resident=args.max_resident, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
            max_new_tokens=args.max_new_tokens, batching=args.batching, context_tokens=args.context_tokens,
            api_key=args.api_key,
            max_prompt_chars=args.max_prompt_chars,
        )
    except KeyboardInterrupt:
        # uvicorn shuts down cleanly on Ctrl-C / SIGTERM, then re-raises the signal: a normal stop.
        pass
    print("deltatune serve: stopped.", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------- tune
def _add_tune(parser: argparse.ArgumentParser) -> None:
    from deltatune.tune import OBJECTIVES

    parser.add_argument("--task", default="sentiment", help="task name (default: sentiment)")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE", help="option passed to the task")
    parser.add_argument("--methods", type=_csv, help="comma-separated PEFT methods to search (default: lora; "
                        "with --quick: lora,ia3,bitfit)")
    parser.add_argument("--quick", action="store_true", help="compare --quick's run length, up to 12 trials, 2 seeds, "
                        "a 13-minute budget: under 15 minutes on 2 CPU cores")
    parser.add_argument("--trials", type=int, help="finished trials the study should hold (default 20; 0: no search)")
    parser.add_argument("--budget-minutes", type=float, help="the whole run's time: no trial starts unless it and "
                        "the confirmation runs still fit (at a typical trial's length)")
    parser.add_argument("--seeds", type=int, help="runs per configuration when confirming on the test split and "
                        "in a sweep (default 3; 0: no confirmation)")
    parser.add_argument("--sweep", metavar="FIELD=V1,V2,...", help="after the search, vary one field of the best "
                        "configuration (one method), e.g. r=1,2,4,8,16,32 for LoRA's rank")
    parser.add_argument("--objectives", type=_csv, default=["quality"],
                        help=f"quality, then any of {', '.join(OBJECTIVES[1:])} (multi-objective: NSGA-II)")
    parser.add_argument("--lr-prior", choices=["range", "registered"], default="range",
                        help="centre each method's learning-rate range on a range test (default) or its registered rate")
    parser.add_argument("--validation", type=int, help="training examples held out to score trials (default 400)")
    parser.add_argument("--no-prune", action="store_true", help="never stop a weak trial early")
    parser.add_argument("--output", default="runs/tune", help="folder for study.db, results.json, report.md, "
                        "best-METHOD.yaml, plots")
    parser.add_argument("--storage", help="an Optuna database URL shared by workers (default: sqlite in --output)")
    parser.add_argument("--workers", type=int, default=1, help="processes running trials of the one study")
    parser.add_argument("--train-option", action="append", metavar="KEY=VALUE", help="a TrainConfig field for every run")
    parser.add_argument("--train-limit", type=int)
    parser.add_argument("--eval-limit", type=int)
    parser.add_argument("--seed", type=int, default=0)


def _sweep_values(text: str | None) -> dict[str, list[Any]] | None:
    """"r=1,2,4" -> {"r": [1, 2, 4]} (values read as YAML scalars: numbers, booleans, words)."""
    if not text:
        return None
    import yaml

    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ValueError(f"--sweep takes FIELD=V1,V2,... (e.g. r=1,2,4,8), got {text!r}.")
    return {name.strip(): [yaml.safe_load(v) for v in values.split(",") if v.strip()]}


def _run_tune(args: argparse.Namespace) -> int:
    from deltatune.tune import tune

    results = tune(
        args.task, args.methods, trials=args.trials, objectives=args.objectives, output_dir=args.output,
        storage=args.storage, workers=args.workers, task_options=_key_values(args.task_option, "--task-option"),
        train=_key_values(args.train_option, "--train-option"), train_limit=args.train_limit,
        eval_limit=args.eval_limit, seed=args.seed, quick=args.quick, budget_minutes=args.budget_minutes,
        seeds=args.seeds, validation=args.validation, prune=not args.no_prune, lr_prior=args.lr_prior,
        sweep=_sweep_values(args.sweep),
    )
    metric = results["metric"]
    for method, entry in results["confirmed"].items():
        print(f"{method}: preset {entry['preset']['mean']:.4g} -> tuned {entry['tuned']['mean']:.4g} test {metric} "
              f"(gain {entry['gain']:+.4f}, seed noise {entry['noise'] or 0:.4f}) -> {results['best'][method]['config']}")
    for sweep in results["sweeps"]:
        print(f"{sweep['method']} {sweep['field']} sweep: " + ", ".join(
            f"{row['value']}: {row['mean']:.4g}" + (f" ± {row['std']:.2g}" if row["std"] is not None else "")
            for row in sweep["rows"]))
    print(f"Report: {Path(args.output) / 'report.md'}")
    return EXIT_OK


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("compare", "train full fine-tuning and every PEFT method on one task and compare them", _add_compare, _run_compare),
    Subcommand("estimate", "predict trainable parameters and memory before training", _add_estimate, _run_estimate),
    Subcommand("train", "train one method on a task and save the adapter", _add_train, _run_train),
    Subcommand("eval", "evaluate a saved adapter on its task", _add_eval, _run_eval),
    Subcommand("inspect", "list saved adapters (method, rank, size) and the storage to serve N tasks", _add_inspect, _run_inspect),
    Subcommand("serve", "serve a base model over HTTP with adapters loaded on demand, batched across adapters", _add_serve, _run_serve),
    Subcommand("tune", "search methods and their hyper-parameters (Optuna; resumable, parallel workers)", _add_tune, _run_tune),
]


def _epilog(command: str) -> str | None:
    """The tasks and their --task-option keys, for the commands that take a task."""
    if command not in ("train", "compare", "eval", "tune"):
        return None
    from deltatune.train.tasks import describe_tasks

    return "tasks (--task NAME) and their options (--task-option KEY=VALUE):\n" + describe_tasks()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning, measured against full fine-tuning.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = commands.add_parser(sub.name, help=sub.help, description=sub.help, epilog=_epilog(sub.name),
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=sub.run)
    return parser


def _stop_on_terminate(signum: int, frame: Any) -> None:
    # `kill` and CI time-outs send SIGTERM: unwind like Ctrl-C so results.json records the stop.
    raise KeyboardInterrupt


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test's capture, a redirect)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_to_stderr() -> None:
    """deltatune's own messages (the training loss without progress bars, resumes) on stderr."""
    log = logging.getLogger("deltatune")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # only when run as the `deltatune` program, not when called from Python
        signal.signal(signal.SIGTERM, _stop_on_terminate)
    if args.command in ("train", "compare", "eval", "tune"):  # serve configures logging its own way
        _log_to_stderr()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("Interrupted; results measured so far are kept in the output folder.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError, OSError) as err:
        if args.traceback:
            raise
        print(f"deltatune {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, (ValueError, TypeError, FileNotFoundError, PermissionError)) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
