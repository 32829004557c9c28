"""Forgetting at matched in-domain quality, read from the curves `compare` records.

A method that learns the task further usually also moves further from the base. Comparing
forgetting at the end of training therefore mixes two things: how much a method forgets and how
far it got. Every method's run evaluates in-domain quality and forgetting a few times during
training (`curve_points`); here each curve is read at the in-domain level *every* method reached
(the weakest method's best), interpolating linearly between the two measured points that bracket
it, so methods are compared where they are equally good at the task.

The verdict against full fine-tuning counts a difference only beyond the noise: the seeds'
spread when the run has several, else (for a proportion such as retrieval top-1 on n questions)
twice the binomial standard error of a difference of two measurements.
"""

from __future__ import annotations

import math
from typing import Any

from .presets import FULL

LOWER_IS_BETTER = {"perplexity", "perplexity_ratio"}
PROPORTIONS = {"accuracy", "macro_f1", "qa_retrieval_top1", "exact_match"}  # shown as percents; binomial noise


def _higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def curve_pairs(record: dict[str, Any]) -> list[tuple[int, float, float]]:
    """(step, in-domain value, forgetting value) of every curve point that has both."""
    pairs = []
    for point in record.get("forgetting_curve") or []:
        quality, forgetting = point.get("in_domain"), point.get("forgetting")
        if quality and forgetting and quality.get("value") is not None and forgetting.get("value") is not None:
            pairs.append((int(point["step"]), float(quality["value"]), float(forgetting["value"])))
    return pairs


def metrics_of(record: dict[str, Any]) -> tuple[str, str] | None:
    """(in-domain metric, forgetting metric) names of a method's curve."""
    for point in record.get("forgetting_curve") or []:
        if point.get("in_domain") and point.get("forgetting"):
            return point["in_domain"]["metric"], point["forgetting"]["metric"]
    return None


def value_at_level(pairs: list[tuple[int, float, float]], level: float, higher_is_better: bool) -> float | None:
    """The forgetting value where the in-domain quality first reaches `level` along the curve
    (linear between the bracketing points); None if it never does."""
    reached = (lambda q: q >= level) if higher_is_better else (lambda q: q <= level)
    for index, (_, quality, forgetting) in enumerate(pairs):
        if not reached(quality):
            continue
        if index == 0:
            return forgetting
        _, previous_quality, previous_forgetting = pairs[index - 1]
        if quality == previous_quality:
            return forgetting
        share = (level - previous_quality) / (quality - previous_quality)
        return previous_forgetting + share * (forgetting - previous_forgetting)
    return None


def matched_forgetting(results: dict[str, Any]) -> dict[str, Any] | None:
    """Every method's forgetting at the in-domain level all methods reached, with the base value,
    the noise and the end-of-training values; None when the run has no usable curves."""
    records = {n: r for n, r in results.get("methods", {}).items() if r.get("status") == "ok" and len(curve_pairs(r)) >= 2}
    if not records:
        return None
    names = {metrics_of(r) for r in records.values()}
    if len(names) != 1:
        return None
    (quality_metric, forgetting_metric), = names
    higher = _higher_is_better(quality_metric)
    bests = [(max if higher else min)(q for _, q, _ in curve_pairs(r)) for r in records.values()]
    level = min(bests) if higher else max(bests)
    base = curve_pairs(next(iter(records.values())))[0][2]  # step 0: the untouched base
    at_level = {name: value_at_level(curve_pairs(r), level, higher) for name, r in records.items()}
    at_end = {name: curve_pairs(r)[-1] for name, r in records.items()}
    return {
        "quality_metric": quality_metric, "forgetting_metric": forgetting_metric, "level": level, "base": base,
        "at_level": at_level, "at_end": {n: {"quality": q, "forgetting": f} for n, (_, q, f) in at_end.items()},
        "steps": sorted({s for r in records.values() for s, _, _ in curve_pairs(r)}),
        "noise": _noise(results, forgetting_metric, base, records),
    }


def _noise(results: dict[str, Any], metric: str, base: float, records: dict[str, Any]) -> dict[str, Any] | None:
    """How large a difference between two methods' forgetting must be to count (see threshold())."""
    spreads = []
    for record in records.values():
        changes = [run["forgetting"]["change"] for run in record.get("seed_runs") or [] if run.get("forgetting")]
        if len(changes) > 1:
            mean = sum(changes) / len(changes)
            spreads.append(math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1)))
    if spreads:
        return {"kind": "seeds", "threshold": 2 * max(spreads),
                "how": f"a difference counts beyond twice the largest seed std of the change ({len(spreads)} methods)"}
    n = (results.get("base_quality", {}).get("forgetting") or {}).get("n")
    if metric in PROPORTIONS and n:
        return {"kind": "binomial", "n": int(n),
                "how": f"a difference counts beyond twice the binomial standard error of a difference of two "
                       f"proportions measured on {n} items"}
    return None


def threshold(noise: dict[str, Any], a: float, b: float) -> float:
    """The difference between values a and b that counts as more than noise."""
    if noise["kind"] == "seeds":
        return noise["threshold"]
    n = noise["n"]
    clamp = lambda p: min(max(p, 1.0 / n), 1.0 - 1.0 / n)  # noqa: E731  (a 0% or 100% reading is not noise-free)
    return 2 * math.sqrt(clamp(a) * (1 - clamp(a)) / n + clamp(b) * (1 - clamp(b)) / n)


def _text(metric: str, value: float) -> str:
    if metric in PROPORTIONS:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f}"


def _change_text(metric: str, change: float) -> str:
    if metric in PROPORTIONS:
        return f"{100 * change:+.1f} points"
    return f"{change:+.2f}" if metric == "perplexity" else f"{change:+.3f}"


def reading(matched: dict[str, Any]) -> str:
    """One paragraph that says what the matched numbers mean, computed from them."""
    quality, metric = matched["quality_metric"], matched["forgetting_metric"]
    higher = _higher_is_better(metric)
    base, level = matched["base"], matched["level"]
    known = {n: v for n, v in matched["at_level"].items() if v is not None}
    listed = ", ".join(f"{n} {_text(metric, v)} ({_change_text(metric, v - base)})"
                       for n, v in sorted(known.items(), key=lambda item: item[1], reverse=higher))
    text = (f"Every method's in-domain {quality} and forgetting ({metric.replace('_', ' ')}) were measured at steps "
            f"{', '.join(str(s) for s in matched['steps'])}. At the in-domain {quality} every method reached "
            f"({_text(quality, level)}), the base model's {_text(metric, base)} stood at: {listed}. ")
    noise = matched.get("noise")
    full = known.get(FULL)
    if full is None:
        return text + "Full fine-tuning has no curve in this run, so there is no reference to read against."
    verdicts = []
    for name, value in known.items():
        if name == FULL:
            continue
        kept_more = (value - full) if higher else (full - value)  # > 0: the method forgot less than full FT
        gap = _change_text(metric, abs(value - full)).lstrip("+")
        limit = threshold(noise, value, full) if noise is not None else None
        if limit is not None and abs(value - full) <= limit:
            verdicts.append(f"{name} and full fine-tuning differ by {gap}, within the noise "
                            f"(±{_change_text(metric, limit).lstrip('+')})")
        else:
            verdicts.append(f"{name} forgot {'less' if kept_more > 0 else 'more'} than full fine-tuning (by {gap})")
    if verdicts:
        text += "At equal task quality, " + "; ".join(verdicts) + ". "
    text += ("Noise: " + noise["how"] + ". " if noise else "No noise estimate for this measure: run with --seeds 3. ")
    return text + ("End-of-training values (table above) compare methods at different in-domain quality; the "
                   "drift readout (similarity Spearman, in results.json) says how far embeddings moved, which "
                   "every method that trains the encoder does, not how much ability was lost.")


def section(results: dict[str, Any]) -> str:
    """report.md's forgetting section: the matched table and the reading."""
    matched = matched_forgetting(results)
    if matched is None:
        return ""
    from .report import markdown_table

    metric = matched["forgetting_metric"]
    rows = []
    for name, value in matched["at_level"].items():
        end = matched["at_end"][name]
        rows.append([name, "-" if value is None else _text(metric, value),
                     "-" if value is None else _change_text(metric, value - matched["base"]),
                     _text(matched["quality_metric"], end["quality"]), _text(metric, end["forgetting"])])
    header = ["method", f"{metric} at matched {matched['quality_metric']}", "change from base",
              f"end: in-domain {matched['quality_metric']}", f"end: {metric}"]
    return ("## Forgetting at matched quality\n\n" + reading(matched) + "\n\n" + markdown_table(header, rows)
            + "\n\nforgetting_curve.png draws every curve: forgetting against in-domain quality.")
