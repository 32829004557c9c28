"""compare's interleaved timing: turns taken in rotating order, weights left as trained, ratios per
round, and the report reading them (no timing assertions: the numbers are synthetic or unchecked)."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.compare.report import headline_checks, step_time, table_rows
from deltatune.compare.timing import interleaved_step_times, ratios_to


class Recorder(nn.Module):
    """A model that logs its name on every forward: the order of turns."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels):
        self.log.append(self.name)
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


def test_rounds_rotate_the_order_and_leave_the_weights_alone():
    log: list[str] = []
    models = {"full": Recorder("full", log), "lora": Recorder("lora", log)}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in models.items()}
    batches = [{"x": torch.randn(3, 4), "labels": torch.randn(3)} for _ in range(2)]
    per_round = interleaved_step_times(models, batches, torch.device("cpu"), rounds=3)
    assert log == ["full", "lora"] + ["full"] * 2 + ["lora"] * 2 + ["lora"] * 2 + ["full"] * 2 + ["full"] * 2 + ["lora"] * 2
    assert {name: len(times) for name, times in per_round.items()} == {"full": 3, "lora": 3}
    assert all(t > 0 for times in per_round.values() for t in times)
    for name, model in models.items():  # AdamW at lr 0: trained weights stay
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[name]))
        assert all(p.grad is None for p in model.parameters())


def test_ratios_are_taken_within_each_round():
    # The whole machine slows down in round 2: both methods take twice as long, the ratio holds.
    summary = ratios_to({"full": [1.0, 2.0, 1.0], "lora": [0.8, 1.6, 0.9]}, "full")
    lora = summary["lora"]
    assert lora["ratio"] == 0.8 and lora["ratio_low"] == 0.8 and lora["ratio_high"] == 0.9
    assert lora["wide"] is True  # 0.1 > 10% of 0.8
    assert summary["full"]["ratio"] == 1.0 and summary["full"]["wide"] is False
    assert ratios_to({"lora": [0.5]}, "full")["lora"] == {"step_s": 0.5, "rounds": 1, "round_step_s": [0.5]}


def results_with_a_busy_stretch() -> dict:
    """LoRA trained while a neighbour hogged the CPUs (its own step looks slower than full's), but the
    interleaved rounds saw it at 0.78x."""
    def method(step_s, interleaved, ratio=None, low=None, high=None):
        time = {"step_s": step_s, "steps": 10, "train_s": 10 * step_s,
                "interleaved": {"step_s": interleaved, "rounds": 5, "round_step_s": [interleaved] * 5}}
        if ratio is not None:
            time["interleaved"].update(ratio=ratio, ratio_low=low, ratio_high=high, wide=False)
        return {"status": "ok", "time": time, "parameters": {"trainable": 10, "percent": 0.5},
                "memory": {"peak": 100}, "quality": {"in_domain": {"accuracy": 0.9}}}

    return {"methods": {"full": method(0.50, 0.50, 1.0, 1.0, 1.0), "lora": method(0.80, 0.39, 0.78, 0.76, 0.80)},
            "timing": {"rounds": 5, "batches": 2, "load_before": 1.0, "load_after": 3.5}, "environment": {}}


def test_the_report_quotes_the_interleaved_ratio():
    results = results_with_a_busy_stretch()
    assert step_time(results["methods"]["lora"], 0.5) == (0.39, 0.78)
    assert step_time({"time": {"step_s": 0.8}}, 0.5) == (0.8, 1.6)  # a run without rounds
    row = next(r for r in table_rows(results) if r[0] == "lora")
    assert "(0.78x)" in " ".join(row)
    checks = {name: (value, ok) for name, value, ok in headline_checks(results, "lora")}
    assert checks["lora step time <= 0.8x full"] == ("0.78x (rounds 0.76-0.80)", True)
