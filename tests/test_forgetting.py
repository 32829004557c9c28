"""Forgetting at matched in-domain quality (compare/forgetting.py): curves read where every method
is equally good at the task, and a verdict against full fine-tuning only beyond the noise."""

from __future__ import annotations

import pytest

from deltatune.compare.forgetting import matched_forgetting, reading, value_at_level


def curve(*points):
    """points: (step, in-domain accuracy, retrieval top-1)."""
    return [{"step": s, "in_domain": {"metric": "accuracy", "value": q},
             "forgetting": {"metric": "qa_retrieval_top1", "value": f}} for s, q, f in points]


def results(**curves):
    return {"methods": {name: {"status": "ok", "forgetting_curve": c} for name, c in curves.items()},
            "base_quality": {"forgetting": {"n": 300}}}


def test_value_at_level_interpolates_between_the_bracketing_points():
    pairs = [(0, 0.33, 0.50), (10, 0.50, 0.40), (20, 0.70, 0.20)]
    assert value_at_level(pairs, 0.60, True) == pytest.approx(0.30)
    assert value_at_level(pairs, 0.50, True) == pytest.approx(0.40)
    assert value_at_level(pairs, 0.80, True) is None  # never reached
    perplexity = [(0, 30.0, 10.0), (10, 20.0, 12.0)]  # lower is better: falling to 25 crosses halfway
    assert value_at_level(perplexity, 25.0, False) == pytest.approx(11.0)


def test_methods_are_compared_where_all_reach_the_same_quality():
    # Full FT goes further on the task and forgets more on the way; at the level LoRA reaches
    # (0.60) full FT had forgotten 0.50 -> 0.30, LoRA only 0.50 -> 0.44.
    matched = matched_forgetting(results(
        full=curve((0, 0.33, 0.50), (10, 0.50, 0.40), (20, 0.70, 0.20), (30, 0.75, 0.10)),
        lora=curve((0, 0.33, 0.50), (10, 0.45, 0.47), (20, 0.55, 0.45), (30, 0.60, 0.44)),
    ))
    assert matched["level"] == pytest.approx(0.60) and matched["base"] == 0.50
    assert matched["at_level"]["full"] == pytest.approx(0.30) and matched["at_level"]["lora"] == pytest.approx(0.44)
    assert matched["at_end"]["full"] == {"quality": 0.75, "forgetting": 0.10}
    text = reading(matched)
    assert "lora forgot less than full fine-tuning (by 14.0 points)" in text
    assert "(60.0%)" in text and "steps 0, 10, 20, 30" in text


def test_a_difference_within_the_noise_is_called_so():
    matched = matched_forgetting(results(
        full=curve((0, 0.33, 0.50), (30, 0.70, 0.45)),
        lora=curve((0, 0.33, 0.50), (30, 0.70, 0.47)),
    ))
    # 2 points apart on 300 questions: the binomial noise of a difference is about 8 points.
    assert "within the noise" in reading(matched) and "forgot less" not in reading(matched)


def test_seed_spread_sets_the_noise_when_the_run_has_seeds():
    data = results(full=curve((0, 0.33, 0.50), (30, 0.70, 0.30)), lora=curve((0, 0.33, 0.50), (30, 0.70, 0.36)))
    data["methods"]["lora"]["seed_runs"] = [{"forgetting": {"change": c}} for c in (-0.14, -0.10, -0.18)]
    matched = matched_forgetting(data)
    assert matched["noise"]["kind"] == "seeds" and matched["noise"]["threshold"] == pytest.approx(0.08)
    assert "lora forgot less than full fine-tuning (by 6.0 points)" not in reading(matched)  # 6 < 8: noise


def test_no_curves_no_section():
    assert matched_forgetting({"methods": {"full": {"status": "ok"}}}) is None
