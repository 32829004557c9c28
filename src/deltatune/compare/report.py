"""Turn a comparison's results.json into the terminal table and report.md.

Everything here reads numbers measured in the run; nothing is filled in when a measurement is
missing (the cell shows "-" and failed methods show their error).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Iterable

from .forgetting import section as forgetting_section
from .measure import MIB
from .presets import FULL

PERCENT_METRICS = {"accuracy", "macro_f1", "qa_retrieval_top1"}
MEMORY_PARTS = ("weights", "gradients", "optimizer_states", "activations", "outputs")


# ---------------------------------------------------------------- reading results
def ok_methods(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in results.get("methods", {}).items() if r.get("status") == "ok"}


def _get(record: dict[str, Any], *path: str) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def as_percent(value: float | None) -> float | None:
    """Metrics may be fractions (0.73) or percents (73.0); show percents."""
    if value is None:
        return None
    return 100.0 * value if abs(value) <= 1.0 else value


def primary_metric(metrics: dict[str, Any] | None) -> tuple[str, float] | None:
    """(name, value) of a split's headline number: accuracy for classification, else perplexity."""
    if not metrics:
        return None
    for name in ("accuracy", "perplexity"):
        if metrics.get(name) is not None:
            return name, metrics[name]
    metric = metrics.get("metric")
    if metric and metrics.get(metric) is not None:
        return metric, metrics[metric]
    return None


def in_domain_value(record: dict[str, Any]) -> tuple[str, float] | None:
    return primary_metric(_get(record, "quality", "in_domain"))


def seed_values(record: dict[str, Any], *path: str) -> list[float]:
    """One number per seed run (`compare(seeds=N)`), read at `path` inside each run; a split name
    as the last key reads its primary metric. Empty without seed runs."""
    values = []
    for run in record.get("seed_runs") or []:
        value = _get(run, *path)
        if isinstance(value, dict):
            value = (primary_metric(value) or (None, None))[1]
        if isinstance(value, (int, float)):
            values.append(float(value))
    return values


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def split_metric(record: dict[str, Any], split: str) -> tuple[str, float, float | None] | None:
    """(metric, value, std) of a split: the mean and std over seeds when the run has several,
    else the one run's value and no std."""
    single = primary_metric(_get(record, "quality", split))
    if single is None:
        return None
    values = seed_values(record, "quality", split)
    if len(values) > 1:
        return (single[0], *mean_std(values))
    return single[0], single[1], None


def storage_for_tasks(results: dict[str, Any], name: str, tasks: int) -> int | None:
    """Bytes to serve `tasks` tasks: N full copies, or the base once plus N adapters."""
    stored = _get(results, "methods", name, "storage", "bytes")
    if stored is None:
        return None
    if name == FULL:
        return tasks * stored
    base = results.get("base_model_bytes")
    return None if base is None else base + tasks * stored


def full_bytes(results: dict[str, Any]) -> int | None:
    return _get(results, "methods", FULL, "storage", "bytes") or results.get("base_model_bytes")


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


# ---------------------------------------------------------------- formatting
def _mib(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value / MIB:,.{digits}f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _metric_text(metric: tuple[str, float] | tuple[str, float, float | None] | None) -> str:
    """A metric as shown; with a std (several seeds) as mean +- std."""
    if metric is None:
        return "-"
    name, value = metric[0], metric[1]
    std = metric[2] if len(metric) > 2 else None
    if name == "perplexity":
        return f"ppl {value:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    if name in PERCENT_METRICS:
        scale = 100.0 if abs(value) <= 1.0 else 1.0
        return f"{scale * value:.1f}" + (f" ± {scale * std:.1f}" if std is not None else "") + "%"
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _ood_text(record: dict[str, Any]) -> str:
    metrics = _get(record, "quality", "out_of_domain")
    text = _metric_text(split_metric(record, "out_of_domain"))
    majority = (metrics or {}).get("majority_baseline")
    return text if majority is None else f"{text} (maj {as_percent(majority):.1f}%)"


def _forgetting_text(record: dict[str, Any]) -> str:
    forgetting = record.get("forgetting")
    if not forgetting:
        return "-"
    metric = forgetting["metric"]
    before, after, change = forgetting["before"], forgetting["after"], forgetting["change"]
    changes = seed_values(record, "forgetting", "change")
    std = None
    if len(changes) > 1:  # several seeds: the mean after and change, the std of the change
        change, std = mean_std(changes)
        after = before + change
    if metric in PERCENT_METRICS:
        scale = 100.0 if max(abs(before), abs(after)) <= 1.0 else 1.0  # fractions shown as percents
        spread = f" ± {scale * std:.1f}" if std is not None else ""
        return f"{scale * before:.1f}->{scale * after:.1f}% ({scale * change:+.1f}{spread})"
    if metric == "perplexity":
        return f"ppl {before:.2f}->{after:.2f} ({change:+.2f}{f' ± {std:.2f}' if std is not None else ''})"
    return f"{before:.3f}->{after:.3f} ({change:+.3f}{f' ± {std:.3f}' if std is not None else ''})"


def step_time(record: dict[str, Any], full_step: float | None) -> tuple[float | None, float | None]:
    """(seconds per step, ratio to full fine-tuning): from the interleaved rounds when the run has
    them (load changes cannot bias those), else from the method's own training stretch."""
    interleaved = _get(record, "time", "interleaved")
    if interleaved and interleaved.get("ratio") is not None:
        return interleaved["step_s"], interleaved["ratio"]
    step = _get(record, "time", "step_s")
    return step, ratio(step, full_step)


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row of text cells per method, in run order (the terminal table and report.md)."""
    full = results.get("methods", {}).get(FULL, {})
    full_step = _get(full, "time", "step_s")
    reference_bytes = full_bytes(results)
    rows = []
    for name, record in results.get("methods", {}).items():
        if record.get("status") != "ok":
            rows.append([name, f"{record.get('status', '?')}: {record.get('error', '')}"[:120]] + [""] * (len(TABLE_HEADER) - 2))
            continue
        params = record.get("parameters", {})
        memory = record.get("memory", {})
        step, step_ratio = step_time(record, full_step)
        stored = _get(record, "storage", "bytes")
        parts = "/".join(_mib(memory.get(p), 0) for p in MEMORY_PARTS[:4])
        rows.append([
            name,
            f"{params.get('trainable', 0):,} ({params.get('percent', 0):.2f}%)",
            _mib(memory.get("peak")),
            parts,
            _base_storage_text(record),
            f"{_num(step, '.3f')} ({_num(step_ratio, '.2f')}x)",
            _num(_get(record, "time", "train_s"), ".0f"),
            f"{_mib(stored, 2)} ({_num(ratio(stored, reference_bytes), '.4f')}x)",
            _metric_text(split_metric(record, "in_domain")),
            _macro_f1_text(record),
            _ood_text(record),
            _forgetting_text(record),
        ])
    return rows


def _base_storage_text(record: dict[str, Any]) -> str:
    """Bytes per linear weight of the frozen base as held in memory, with its 4-bit type if any."""
    per_param = _get(record, "base_storage", "linear_bytes_per_param")
    quant_type = _get(record, "base_storage", "quant_type")
    return _num(per_param, ".3f") + (f" {quant_type}" if quant_type else "")


def _macro_f1_text(record: dict[str, Any]) -> str:
    f1 = _get(record, "quality", "in_domain", "macro_f1")
    return "-" if f1 is None else f"{as_percent(f1):.1f}%"


TABLE_HEADER = [
    "method", "trainable (%)", "peak MiB", "W/G/O/A MiB", "base B/w", "s/step (x full)", "train s",
    "stored MiB (x full)", "in-domain", "macro-F1", "OOD (majority)", "forgetting",
]


def render_table(results: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table for the terminal."""
    rows = table_rows(results)
    measured = [r for r in rows if r[2]]  # a failed method's message spans its row: not a column
    widths = [max([len(h), *(len(r[i]) for r in measured)] + ([len(r[0]) for r in rows] if i == 0 else [])) for i, h in enumerate(TABLE_HEADER)]

    def line(cells: list[str]) -> str:
        if not cells[2] and cells[1]:  # failed method: its message spans the row
            return f"{cells[0]:<{widths[0]}} | {cells[1]}"
        return " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))

    title = _title(results)
    rule = "-" * len(line(TABLE_HEADER))
    notes = (
        "W/G/O/A: weights / gradients / optimizer states / activations, measured on one training batch.\n"
        "base B/w: bytes per linear-layer weight of the base as held (4 in float32; NF4 with double quantization about 0.52).\n"
        "s/step: lower quartile of the steps after warm-up (other programs only add time); train s: unfiltered."
    )
    return "\n".join([title, rule, line(TABLE_HEADER), rule, *(line(r) for r in rows), rule, notes])


def _title(results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    task = results.get("task", {})
    return (
        f"deltatune compare: task {settings.get('task')} ({task.get('train_examples', '?')} training examples, "
        f"{task.get('sequence_length', '?')} tokens), {settings.get('max_steps')} steps x batch "
        f"{settings.get('batch_size')}, {_seeds_text(settings)}, preset {settings.get('preset')}"
        + (f", PEFT bases in {settings['quantize']} (full FT in full precision)" if settings.get("quantize") else "")
        + (f", each method trained over {settings['processes']} processes ({settings.get('distributed')}; memory: "
           "one process's step on the whole batch)" if (settings.get("processes") or 1) > 1 else "")
    )


def _seeds_text(settings: dict[str, Any]) -> str:
    seed, seeds = settings.get("seed"), settings.get("seeds") or 1
    if seeds > 1 and isinstance(seed, int):
        return f"seeds {seed}-{seed + seeds - 1} (quality: mean ± std)"
    return f"seed {seed}"


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- report.md sections
def _memory_section(results: dict[str, Any]) -> str:
    full_memory = _get(results, "methods", FULL, "memory") or {}
    full_training_state = (full_memory.get("gradients") or 0) + (full_memory.get("optimizer_states") or 0)
    rows = []
    for name, record in ok_methods(results).items():
        memory = record.get("memory", {})
        state = (memory.get("gradients") or 0) + (memory.get("optimizer_states") or 0)
        rows.append([
            name, *(_mib(memory.get(p)) for p in MEMORY_PARTS), _mib(memory.get("peak")),
            _num(100 * ratio(state, full_training_state) if full_training_state else None, ".2f"),
            _mib(memory.get("process_rss_peak")), _mib(memory.get("device_peak")), _mib(memory.get("device_peak_training")),
        ])
    header = [
        "method", "weights", "gradients", "optimizer", "activations", "outputs", "peak", "grads+optim % of full",
        "process RSS peak", "CUDA peak (probe step)", "CUDA peak (training)",
    ]
    return (
        "## Memory (MiB)\n\n"
        "Measured on one training batch with the run's exact settings: weights = parameters and buffers; "
        "gradients = `.grad` tensors after backward; optimizer = AdamW state tensors after a step; "
        "activations = tensors autograd saved for backward (saved-tensor hooks, each storage once, parameters "
        "excluded); outputs = logits/loss held until backward. Peak = their sum. Process RSS peak (whole "
        "Python process during training, sampled) and the CUDA allocator peak are for information.\n\n"
        + markdown_table(header, rows)
    )


def _estimate_section(results: dict[str, Any]) -> str:
    estimates = _get(results, "estimates", "methods") or {}
    if not estimates:
        return ""
    rows = []
    for name, estimate in estimates.items():
        record = results.get("methods", {}).get(name, {})
        errors = record.get("estimate_error_percent") or {}
        if "error" in estimate:
            rows.append([name, f"not estimated: {estimate['error']}", "", "", "", ""])
            continue
        rows.append([
            name, _mib(_get(estimate, "memory", "peak")), _mib(_get(record, "memory", "peak")),
            _num(errors.get("peak"), "+.1f"), _num(errors.get("activations"), "+.1f"),
            f"{estimate.get('trainable', 0):,} vs {_get(record, 'parameters', 'trainable') or 0:,}",
        ])
    shape = results.get("estimates", {})
    return (
        "## Estimate vs measurement\n\n"
        f"`deltatune estimate` made before training from the model config alone (meta device, batch "
        f"{shape.get('batch_size')} x {shape.get('seq_len')} tokens), against the measured step.\n\n"
        + markdown_table(["method", "estimated peak MiB", "measured peak MiB", "peak error %", "activations error %", "trainable (estimated vs measured)"], rows)
    )


def _time_section(results: dict[str, Any]) -> str:
    full_step = _get(results, "methods", FULL, "time", "step_s")
    timing = results.get("timing") or {}
    rows = []
    for name, record in ok_methods(results).items():
        step = _get(record, "time", "step_s")
        interleaved = _get(record, "time", "interleaved") or {}
        spread = (f"{interleaved['ratio_low']:.2f}-{interleaved['ratio_high']:.2f}" + (" (wide)" if interleaved.get("wide") else "")
                  if "ratio_low" in interleaved else "-")
        rows.append([
            name, _num(interleaved.get("step_s"), ".3f"), _num(interleaved.get("ratio"), ".2f"), spread,
            _num(step, ".3f"), _num(ratio(step, full_step), ".2f"), _get(record, "time", "steps"),
            _num(_get(record, "time", "train_s"), ".1f"), _num(record.get("wall_s"), ".1f"),
        ])
    if timing.get("rounds"):
        clock = timing.get("clock", "wall time")
        how = (f"After training, every method's step was timed in {timing['rounds']} interleaved rounds ({timing['batches']} "
               "steps per method per round on the same batches, the order rotated each round, AdamW at learning rate 0 "
               f"so the trained weights stay; clock: {clock}): a change of load hits every method of a round alike"
               + (" and a neighbour cannot stretch one thread's CPU time" if "CPU time" in clock else "") + ". `x full` is the "
               "median of the rounds' ratios, `rounds` their range; a range wider than 10% of the ratio is marked "
               f"wide. Load average {_num(timing.get('load_before'), '.1f')} before the rounds, "
               f"{_num(timing.get('load_after'), '.1f')} after. ")
    else:
        why = timing.get("error") or timing.get("skipped")
        how = f"No interleaved rounds in this run{': ' + why if why else ''}. "
    return (
        "## Time\n\n" + how +
        "`during training`: seconds per optimizer step while the method trained (the lower quartile after 3 "
        "warm-up steps) and its ratio to full fine-tuning's, measured in different stretches of time; train s is "
        "the whole training call, unfiltered; wall s also holds loading, measuring, evaluating and saving.\n\n"
        + busy_machine_warning(results)
        + markdown_table(["method", "s/step", "x full", "rounds", "s/step during training", "x full during training",
                          "steps", "train s", "wall s"], rows)
    )


def load_samples(results: dict[str, Any], *, running_only: bool = False) -> list[float]:
    """The 1-minute load averages the run took: at its start and end, around each method's training
    and around the interleaved rounds. running_only: those taken after a method's training, when the
    run's own load has built up (the first samples read the machine before the run)."""
    env = results.get("environment", {})
    samples = [] if running_only else [env.get("load_average_start")]
    for record in results.get("methods", {}).values():
        loads = list(_get(record, "time", "load_average") or [])
        samples += loads[1:] if running_only else loads
    timing = results.get("timing") or {}
    samples += [timing.get("load_before"), timing.get("load_after")]
    return [float(v) for v in samples if v is not None]


def busy_machine_warning(results: dict[str, Any]) -> str:
    """A warning when other programs shared the CPUs during the run or its load changed: the step
    times measured during training are then not comparable across methods."""
    env = results.get("environment", {})
    loads = load_samples(results) + [v for v in (env.get("load_average_end"),) if v is not None]
    running = load_samples(results, running_only=True)
    cpus = env.get("cpu_count") or 0
    busy = bool(loads) and cpus and max(loads) > cpus + 1.0  # the run itself keeps about cpus busy
    changed = len(running) > 1 and cpus and max(running) - min(running) > max(1.0, cpus / 2)
    if not busy and not changed:
        return ""
    what = []
    if busy:
        what.append(f"busy (load average up to {max(loads):.1f} on {cpus} CPUs)")
    if changed:
        what.append(f"its load changed during the run (from {min(running):.1f} to {max(running):.1f})")
    rounds = any(_get(r, "time", "interleaved", "ratio") is not None for r in results.get("methods", {}).values())
    reading = ("the step times measured during training are not comparable across methods; the interleaved ratios, "
               "which every method measured under the same load, are the ones to read." if rounds else
               "step times and their ratios are not reliable in this run.")
    return f"**Warning:** the machine was {' and '.join(what)}: other programs shared the cores, so {reading}\n\n"


def _storage_section(results: dict[str, Any]) -> str:
    tasks = results.get("settings", {}).get("storage_tasks", 100)
    counts = sorted({1, 10, tasks})
    reference = full_bytes(results)
    rows = []
    for name, record in ok_methods(results).items():
        stored = _get(record, "storage", "bytes")
        rows.append([
            name, _get(record, "storage", "kind") or "-", _num(stored, ","), _num(100 * ratio(stored, reference) if reference else None, ".3f"),
            *(_mib(storage_for_tasks(results, name, n)) for n in counts),
        ])
    return (
        "## Storage\n\n"
        f"Bytes written to disk for one task (full fine-tuning: the whole model as safetensors; PEFT: the "
        f"adapter folder from `save()`), and MiB to keep N tasks: N full copies, or the base model "
        f"({_mib(results.get('base_model_bytes'))} MiB) once plus N adapters.\n\n"
        + markdown_table(["method", "what", "bytes", "% of full", *(f"{n} task{'s' if n > 1 else ''} MiB" for n in counts)], rows)
    )


def _quality_section(results: dict[str, Any]) -> str:
    splits = results.get("task", {}).get("eval_splits", {}) or {}
    names = list(splits) or sorted({s for r in ok_methods(results).values() for s in r.get("quality", {})})
    rows = []
    for name, record in ok_methods(results).items():
        cells = [name]
        for split in names:
            metrics = _get(record, "quality", split) or {}
            text = _metric_text(split_metric(record, split))
            if metrics.get("macro_f1") is not None:
                text += f", F1 {as_percent(metrics['macro_f1']):.1f}%"
            if metrics.get("exact_match") is not None:
                text += f", exact match {as_percent(metrics['exact_match']):.1f}% of {metrics.get('exact_match_n')}"
            if metrics.get("majority_baseline") is not None:
                text += f" (majority {as_percent(metrics['majority_baseline']):.1f}%)"
            cells.append(text)
        cells.append(_forgetting_text(record))
        rows.append(cells)
    described = "\n".join(f"- **{split}**: {text}" for split, text in splits.items())
    base = _get(results, "base_quality", "forgetting")
    base_line = f"\nBase model before training, forgetting split: {_metric_text(primary_metric(base))}.\n" if base else ""
    return (
        "## Quality\n\n" + described + "\n" + base_line + "\n"
        "Out-of-domain scores are a robustness readout: read them beside the majority-class baseline, "
        "which a model can fall below on a shifted domain."
        + (" Each score is the mean ± sample std over the seeds; F1 and the majority baseline are the first seed's."
           if (results.get("settings", {}).get("seeds") or 1) > 1 else "") + "\n\n"
        + markdown_table(["method", *names, "forgetting (before->after)"], rows)
    )


def _settings_section(results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    rows = [
        [name, f"{s['lr']:g}", s.get("kind", ""), ", ".join(f"{k}={v}" for k, v in s.get("config", {}).items()) or "-"]
        for name, s in results.get("method_settings", {}).items()
    ]
    env = results.get("environment", {})
    return (
        "## Settings\n\n"
        f"All methods: task `{settings.get('task')}`, {settings.get('max_steps')} steps, batch {settings.get('batch_size')}, "
        f"{_seeds_text(settings)}, the same data order per seed, AdamW, linear schedule with warm-up; "
        f"train limit {settings.get('train_limit')}, eval limit {settings.get('eval_limit')} per split. "
        f"Environment: torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"{env.get('cpu_count')} CPUs, {env.get('torch_threads')} torch threads, CUDA: {env.get('cuda') or 'none'}.\n\n"
        + markdown_table(["method", "lr", "kind", "config"], rows)
    )


def _failures_section(results: dict[str, Any]) -> str:
    failed = {n: r for n, r in results.get("methods", {}).items() if r.get("status") != "ok"}
    if not failed and not results.get("error"):
        return ""
    lines = ["## Failures\n"]
    lines += [f"- **{name}** ({r.get('status')}): {r.get('error', '')}" for name, r in failed.items()]
    if results.get("error"):
        lines.append(f"- run: {results['error']}")
    return "\n".join(lines)


def headline_checks(results: dict[str, Any], method: str = "lora") -> list[tuple[str, str, bool | None]]:
    """The project's acceptance comparisons of `method` against full fine-tuning, from this run."""
    full = ok_methods(results).get(FULL)
    peft = ok_methods(results).get(method)
    if not full or not peft:
        return []
    checks: list[tuple[str, str, bool | None]] = []
    full_q, peft_q = split_metric(full, "in_domain"), split_metric(peft, "in_domain")  # means over seeds
    if full_q and peft_q and full_q[0] == "accuracy":
        gap = as_percent(full_q[1]) - as_percent(peft_q[1])
        checks.append((f"{method} in-domain accuracy within 2 points of full", f"gap {gap:+.2f} points", gap <= 2.0))
    percent = _get(peft, "parameters", "percent")
    checks.append((f"{method} trains < 1% of the parameters", f"{percent:.3f}%", percent < 1.0))
    stored = ratio(_get(peft, "storage", "bytes"), _get(full, "storage", "bytes"))
    if stored is not None:
        checks.append((f"{method} stores < 1% of the bytes", f"{100 * stored:.3f}%", stored < 0.01))
    state = ratio(
        (_get(peft, "memory", "gradients") or 0) + (_get(peft, "memory", "optimizer_states") or 0),
        (_get(full, "memory", "gradients") or 0) + (_get(full, "memory", "optimizer_states") or 0),
    )
    if state is not None:
        checks.append((f"{method} gradient + optimizer memory < 2% of full", f"{100 * state:.3f}%", state < 0.02))
    _, step = step_time(peft, _get(full, "time", "step_s"))
    if step is not None:
        interleaved = _get(peft, "time", "interleaved") or {}
        if "ratio_low" in interleaved:
            note = f" (rounds {interleaved['ratio_low']:.2f}-{interleaved['ratio_high']:.2f}{', wide' if interleaved['wide'] else ''})"
        else:
            note = " (machine busy: unreliable)" if busy_machine_warning(results) else ""
        checks.append((f"{method} step time <= 0.8x full", f"{step:.2f}x{note}", step <= 0.8))
    peak = ratio(_get(peft, "memory", "peak"), _get(full, "memory", "peak"))
    if peak is not None:
        checks.append((f"{method} peak memory below full", f"{peak:.2f}x", peak < 1.0))
    for name in (FULL, method):
        error = _get(results, "methods", name, "estimate_error_percent", "peak")
        if error is not None:
            checks.append((f"estimate within 15% of measured peak ({name})", f"{error:+.1f}%", abs(error) <= 15.0))
    return checks


def _checks_section(results: dict[str, Any]) -> str:
    checks = headline_checks(results)
    if not checks:
        return ""
    rows = [[name, value, "yes" if passed else "no"] for name, value, passed in checks]
    return "## LoRA against full fine-tuning, from this run\n\n" + markdown_table(["check", "measured", "met"], rows)


def _plots_section(output_dir: Path) -> str:
    from .plots import PLOT_FILES

    present = [(title, name) for name, title in PLOT_FILES.items() if (output_dir / name).exists()]
    if not present:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{title}]({name})" for title, name in present)


def render_markdown(results: dict[str, Any], output_dir: Path | None = None) -> str:
    rows = table_rows(results)
    summary = markdown_table(TABLE_HEADER, rows)
    sections = [
        f"# deltatune compare: {results.get('settings', {}).get('task')}\n\n{_title(results)}. "
        f"Status: {results.get('status')}.",
        "## Summary\n\n" + summary,
        _checks_section(results),
        _memory_section(results),
        _estimate_section(results),
        _time_section(results),
        _storage_section(results),
        _quality_section(results),
        forgetting_section(results),
        _settings_section(results),
        _failures_section(results),
        _plots_section(output_dir) if output_dir else "",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_markdown(results: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_markdown(results, path.parent))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- estimate vs measurement
def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A compare run's results.json (the file, or the run folder holding it)."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"No results file at {path}; pass the results.json of a `deltatune compare` run.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None


def estimate_comparison_text(results: dict[str, Any]) -> str:
    """Per method: the estimate made before training against the measured step, in MiB and %."""
    shape = results.get("estimates", {})
    header = f"{'method':<12} {'estimated':>10} {'measured':>10} {'error':>8}   per part (estimated/measured MiB)"
    lines = [
        f"Estimate (batch {shape.get('batch_size')} x {shape.get('seq_len')} tokens) vs measured training step, MiB",
        header,
        "-" * len(header),
    ]
    for name, estimate in (shape.get("methods") or {}).items():
        measured = _get(results, "methods", name, "memory")
        if "error" in estimate:
            lines.append(f"{name:<12} not estimated: {estimate['error']}")
            continue
        if not measured:
            lines.append(f"{name:<12} {_mib(_get(estimate, 'memory', 'peak')):>10} {'-':>10} {'-':>8}   (not measured)")
            continue
        error = _get(results, "methods", name, "estimate_error_percent", "peak")
        parts = ", ".join(
            f"{part[:5]} {_mib(_get(estimate, 'memory', part), 0)}/{_mib(measured.get(part), 0)}" for part in MEMORY_PARTS[:4]
        )
        lines.append(
            f"{name:<12} {_mib(_get(estimate, 'memory', 'peak')):>10} {_mib(measured.get('peak')):>10} {_num(error, '+.1f'):>7}%   {parts}"
        )
    return "\n".join(lines)
