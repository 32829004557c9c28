"""PNG plots of a comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .measure import MIB
from .presets import FULL
from .report import MEMORY_PARTS, ok_methods, split_metric, storage_for_tasks

PLOT_FILES = {
    "memory_breakdown.png": "Memory breakdown per method",
    "storage_tasks.png": "Storage for 1..N tasks",
    "quality_vs_params.png": "Quality against trainable parameters",
    "loss_curves.png": "Training loss",
    "forgetting_curve.png": "Forgetting against in-domain quality during training",
}
PART_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "outputs": "outputs (logits)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_memory(results: dict[str, Any], path: Path) -> Path | None:
    methods = {n: r for n, r in ok_methods(results).items() if r.get("memory")}
    if not methods:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) + 3), 4.5))
    names = list(methods)
    bottom = [0.0] * len(names)
    for part in MEMORY_PARTS:
        values = [(methods[n]["memory"].get(part) or 0) / MIB for n in names]
        ax.bar(names, values, bottom=bottom, label=PART_LABELS[part])
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:,.0f}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.12)  # room for the totals above the bars
    ax.set_ylabel("MiB (one training step)")
    ax.set_title("Memory breakdown, measured")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_storage(results: dict[str, Any], path: Path) -> Path | None:
    tasks = int(results.get("settings", {}).get("storage_tasks", 100))
    counts = list(range(1, tasks + 1))
    series = {}
    for name in ok_methods(results):
        values = [storage_for_tasks(results, name, n) for n in counts]
        if all(v is not None for v in values):
            series[name] = [v / MIB for v in values]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series.items():
        ax.plot(counts, values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("MiB on disk (log scale)")
    ax.set_title("Storage: N full copies vs one base + N adapters")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_quality(results: dict[str, Any], path: Path) -> Path | None:
    """In-domain quality against trainable parameters; with several seeds the points are means with
    +- std error bars; full fine-tuning's level is drawn across as the reference line."""
    points = []
    for name, record in ok_methods(results).items():
        metric = split_metric(record, "in_domain")
        trainable = record.get("parameters", {}).get("trainable")
        if metric and trainable:
            scale = 1.0 if metric[0] == "perplexity" or abs(metric[1]) > 1.0 else 100.0
            std = None if metric[2] is None else scale * metric[2]
            points.append((name, trainable, scale * metric[1], std, metric[0]))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, trainable, value, std, _ in points:
        ax.errorbar(trainable, value, yerr=std, fmt="o", capsize=4)
        ax.annotate(name, (trainable, value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    full = next((p for p in points if p[0] == FULL), None)
    if full is not None:
        ax.axhline(full[2], color="grey", linestyle="--", linewidth=1, label="full fine-tuning")
        if full[3]:
            ax.axhspan(full[2] - full[3], full[2] + full[3], color="grey", alpha=0.15)
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    metric = points[0][4]
    ax.set_ylabel("in-domain perplexity (lower is better)" if metric == "perplexity" else f"in-domain {metric} (%)")
    seeds = results.get("settings", {}).get("seeds") or 1
    ax.set_title("Quality against trainable parameters" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(results: dict[str, Any], path: Path) -> Path | None:
    curves = {n: r["losses"] for n, r in results.get("methods", {}).items() if r.get("losses")}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    window = max(1, max(len(c) for c in curves.values()) // 20)
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), _smooth(losses, window), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (moving mean of {window})")
    ax.set_title("Loss curves")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_forgetting_curves(results: dict[str, Any], path: Path) -> Path | None:
    """Each method's path from the base (in-domain quality at chance) to its end, as forgetting
    against in-domain quality; the matched level is the vertical line the report reads at."""
    from .forgetting import curve_pairs, matched_forgetting

    matched = matched_forgetting(results)
    if matched is None:
        return None
    percent = lambda metric, v: v if metric == "perplexity" or abs(v) > 1.0 else 100 * v  # noqa: E731
    qm, fm = matched["quality_metric"], matched["forgetting_metric"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, record in ok_methods(results).items():
        pairs = curve_pairs(record)
        if len(pairs) >= 2:
            ax.plot([percent(qm, q) for _, q, _ in pairs], [percent(fm, f) for _, _, f in pairs], marker="o", label=name)
    ax.axvline(percent(qm, matched["level"]), color="grey", linestyle="--", linewidth=1, label="matched level")
    ax.axhline(percent(fm, matched["base"]), color="black", linestyle=":", linewidth=1, label="base model")
    ax.set_xlabel(f"in-domain {qm}" + ("" if qm == "perplexity" else " (%)"))
    ax.set_ylabel(fm.replace("_", " ") + ("" if fm in ("perplexity", "similarity_spearman") else " (%)"))
    ax.set_title("Forgetting along training (points: evaluations during the run)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def write_plots(results: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Write every plot the results have data for; returns the files written."""
    output_dir = Path(output_dir)
    makers = [plot_memory, plot_storage, plot_quality, plot_losses, plot_forgetting_curves]
    written = []
    for maker, name in zip(makers, PLOT_FILES):
        path = maker(results, output_dir / name)
        if path is not None:
            written.append(path)
    return written
