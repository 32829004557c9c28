"""What a search leaves a person to act on: results.json, report.md and PNG plots.

* pareto.png: validation quality against peak memory, step time and trainable parameters, every
  finished trial coloured by method, the Pareto front of each panel joined by a line;
* lr_sensitivity.png: validation quality against the learning rate, per method (log scale);
* sweep-METHOD-FIELD.png: test quality against the swept field, mean with the seeds' std as
  error bars, the preset's mean as a reference line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deltatune.compare.plots import _pyplot, _save

MIB = 2**20
COSTS = {"memory": ("peak memory of one step (MiB)", MIB), "step_time": ("step time (s)", 1.0),
         "params": ("trainable parameters", 1.0)}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial: state, method, searched values, measures (finished ones), last validation score."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        intermediate = t.intermediate_values
        rows.append({
            "number": t.number, "state": t.state.name, "method": t.params.get("method"), "params": t.params,
            "preset": bool(t.user_attrs.get("preset")), "measures": t.user_attrs.get("measures"),
            "last_intermediate": intermediate[max(intermediate)] if intermediate else None,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    return rows


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both quality (first) and cost (second)."""
    def better_or_equal(a: tuple[float, float], b: tuple[float, float]) -> bool:
        quality = a[0] >= b[0] if maximize else a[0] <= b[0]
        return quality and a[1] <= b[1]

    return [i for i, p in enumerate(points)
            if not any(better_or_equal(q, p) and q != p for j, q in enumerate(points) if j != i)]


def _by_method(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["state"] == "COMPLETE" and row["measures"]:
            grouped.setdefault(row["method"], []).append(row)
    return grouped


def plot_pareto(rows: list[dict[str, Any]], metric: str, maximize: bool, path: Path) -> Path | None:
    grouped = _by_method(rows)
    if not grouped:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COSTS), figsize=(4.2 * len(COSTS), 3.8), sharey=True)
    everyone = [row for own in grouped.values() for row in own]
    for ax, (cost, (label, unit)) in zip(axes, COSTS.items()):
        for method, own in grouped.items():
            ax.scatter([r["measures"][cost] / unit for r in own], [r["measures"]["quality"] for r in own],
                       label=method, alpha=0.75)
        points = [(r["measures"]["quality"], r["measures"][cost] / unit) for r in everyone]
        front = sorted((points[i] for i in pareto_front(points, maximize)), key=lambda p: p[1])
        ax.plot([p[1] for p in front], [p[0] for p in front], color="black", linewidth=1, label="Pareto front")
        ax.set_xlabel(label)
        if cost == "params":
            ax.set_xscale("log")
    axes[0].set_ylabel(f"validation {metric}")
    axes[0].legend(fontsize=8)
    fig.suptitle("Every finished trial: quality against cost")
    return _save(fig, path)


def plot_lr(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    grouped = _by_method(rows)
    if not grouped:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, own in grouped.items():
        own = sorted(own, key=lambda r: r["params"][f"{method}.lr"])
        ax.plot([r["params"][f"{method}.lr"] for r in own], [r["measures"]["quality"] for r in own], "o-",
                label=method, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("Sensitivity to the learning rate (finished trials)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(result: dict[str, Any], preset: dict[str, Any] | None, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = result["rows"]
    numeric = all(isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool) for r in rows)
    xs = [r["value"] if numeric else str(r["value"]) for r in rows]
    ax.errorbar(xs, [r["mean"] for r in rows], yerr=[r["std"] or 0 for r in rows], fmt="o-", capsize=4,
                label=f"{result['method']}, {result['seeds']} seed(s) each")
    if preset:
        ax.axhline(preset["mean"], color="gray", linestyle="--", label="compare preset (mean)")
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(result["field"])
    ax.set_ylabel(f"test {result['metric']} (mean ± std)")
    ax.set_title(f"{result['method']}: quality against {result['field']} at lr {result['lr']:.3g}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _mean_std(entry: dict[str, Any]) -> str:
    std = f" ± {_fmt(entry['std'], 2)}" if entry.get("std") is not None else ""
    return f"{_fmt(entry['mean'])}{std}"


def report_markdown(results: dict[str, Any], plots: list[str]) -> str:
    metric, maximize = results["metric"], results["direction"] == "maximize"
    states: dict[str, int] = {}
    for row in results["trials"]:
        states[row["state"]] = states.get(row["state"], 0) + 1
    lines = [
        f"# deltatune tune: {results['task']}",
        "",
        f"{len(results['trials'])} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}) "
        f"over {', '.join(results['methods'])} in {results['search_s'] / 60:.1f} min; objectives: "
        f"{', '.join(results['objectives'])}. Trials were scored on {results['validation']} training examples held "
        f"out from training (validation); the test numbers below come from fresh runs on the whole training data, "
        f"{results['seeds']} seed(s) each, on the task's in-domain test split. Study: `{results['storage']}`.",
        "",
    ]
    if results["stopped"]:
        lines += [f"Stopped early: {results['stopped']}.", ""]
    confirmed = results.get("confirmed", {})
    if confirmed:
        better = "higher" if maximize else "lower"
        lines += [
            f"## Tuned against the compare preset (test {metric}, {better} is better)",
            "",
            "| method | preset lr | preset | tuned lr | tuned | gain | seed noise (std) | tuned settings | config |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, entry in confirmed.items():
            settings = ", ".join(f"{k}={_value(v)}" for k, v in entry["tuned"]["fields"].items()) or "the preset's fields"
            lines.append(
                f"| {method} | {_fmt(entry['preset']['lr'], 3)} | {_mean_std(entry['preset'])} | "
                f"{_fmt(entry['tuned']['lr'], 3)} | {_mean_std(entry['tuned'])} | {entry['gain']:+.4f} | "
                f"{_fmt(entry['noise'], 2)} | {settings} | `{Path(results['best'][method]['config']).name}` |")
        lines += ["", _reading(confirmed, metric), ""]
    for sweep in results.get("sweeps", []):
        lines += [f"## {sweep['method']}: {sweep['field']} sweep at lr {_fmt(sweep['lr'], 3)} "
                  f"({sweep['seeds']} seeds, test {metric})", "", f"| {sweep['field']} | mean ± std | runs |", "|---|---|---|"]
        lines += [f"| {r['value']} | {_mean_std(r)} | {', '.join(_fmt(v) for v in r['values'])} |" for r in sweep["rows"]]
        lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _reading(confirmed: dict[str, Any], metric: str) -> str:
    """One sentence per method: is the gain larger than the seed noise?"""
    parts = []
    for method, entry in confirmed.items():
        noise = entry["noise"] or 0.0
        if entry["gain"] > 2 * noise:
            verdict = "a gain well beyond the seed noise"
        elif entry["gain"] >= -2 * noise:
            verdict = "within the seed noise of the preset"
        else:
            verdict = "worse than the preset beyond the seed noise (the validation choice did not carry over)"
        parts.append(f"{method}: {entry['gain']:+.4f} {metric}, {verdict}")
    return "Reading: " + "; ".join(parts) + "."
