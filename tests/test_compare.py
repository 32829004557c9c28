"""The comparison job on a tiny task: measurement, results.json, failures, report and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_classifier

import deltatune as dt
from deltatune.compare import compare
from deltatune.compare.measure import (
    MemoryBreakdown,
    SavedTensorCounter,
    measure_training_step,
    save_full_checkpoint,
    steady_step_time,
    storage_bytes,
    weight_bytes,
)
from deltatune.compare.methods import method_settings, validate_methods
from deltatune.compare.report import headline_checks, render_markdown, render_table, storage_for_tasks
from deltatune.compare.runner import ResultsFile

VOCAB, LENGTH = 101, 12


class TinyTask:
    """A 3-class task a 2-layer BERT learns in a few steps: the label is which token range appears.

    Satisfies the deltatune.train Task contract; the forgetting split measures agreement with
    the untrained model's predictions on fixed inputs (1.0 before training).
    """

    name = "tiny"
    kind = "classification"
    num_labels = 3
    label_names = ["low", "mid", "high"]
    head_modules = ["classifier"]

    def __init__(self, train_size: int = 96, fail_train_data: str | None = None) -> None:
        self.train_size = train_size
        self.fail_train_data = fail_train_data
        self._reference: list[int] | None = None

    def load_model(self):
        return tiny_bert_classifier(layers=2, hidden=32, labels=3, seed=0), None

    def _examples(self, count: int, seed: int) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        examples = []
        for _ in range(count):
            label = int(torch.randint(0, 3, (1,), generator=generator))
            ids = torch.randint(40, VOCAB, (LENGTH,), generator=generator)
            ids[int(torch.randint(1, LENGTH, (1,), generator=generator))] = 10 + 10 * label
            examples.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": torch.tensor(label)})
        return examples

    def train_data(self, tokenizer, limit=None):
        if self.fail_train_data:
            raise ValueError(self.fail_train_data)
        return self._examples(limit or self.train_size, seed=1)

    def collate(self, examples):
        return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}

    def eval_splits(self):
        return {"in_domain": "held-out tiny examples", "out_of_domain": "other seed", "forgetting": "agreement with the base"}

    def _predict(self, model, examples):
        model.eval()
        with torch.no_grad():
            logits = model(**{k: v for k, v in self.collate(examples).items() if k != "labels"}).logits
        return logits.argmax(-1).tolist()

    def evaluate(self, model, tokenizer, split, limit=None, batch_size=64):
        examples = self._examples(limit or 48, seed={"in_domain": 2, "out_of_domain": 3, "forgetting": 4}[split])
        predicted = self._predict(model, examples)
        if split == "forgetting":
            if self._reference is None:
                self._reference = self._predict(self.load_model()[0], examples)
            agreement = sum(p == r for p, r in zip(predicted, self._reference)) / len(examples)
            return {"metric": "accuracy", "accuracy": agreement, "n": len(examples)}
        gold = [int(e["labels"]) for e in examples]
        accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
        majority = max(gold.count(c) for c in range(3)) / len(gold)
        return {"accuracy": accuracy, "macro_f1": accuracy, "majority_baseline": majority, "n": len(gold)}


def run_tiny(tmp_path: Path, methods="full,lora", **overrides):
    task = overrides.pop("task", None) or TinyTask()
    options = dict(max_steps=6, batch_size=8, eval_limit=24, progress=False, console=None, lrs={"full": 1e-3, "lora": 1e-2})
    options.update(overrides)
    return compare(task, methods, output_dir=tmp_path / "run", **options)


# ---------------------------------------------------------------- measurement
def test_saved_tensor_counter_counts_each_storage_once_and_skips_parameters():
    weight = torch.nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensorCounter(exclude=[weight]) as saved:
        hidden = x @ weight  # saves x (and the weight, excluded)
        out = torch.tanh(hidden) * x  # tanh saves its output; mul saves that output and x again
    out.sum().backward()
    assert saved.total_bytes == 2 * 4 * 16 * 4  # x and tanh's output, 64 floats each


def test_measure_training_step_breakdown_matches_hand_count():
    model = tiny_bert_classifier()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier"))
    batch = {"input_ids": torch.randint(0, VOCAB, (4, LENGTH)), "labels": torch.tensor([0, 1, 2, 0])}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    memory = measure_training_step(model, batch, device="cpu")
    head_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("classifier"))
    assert memory.weights == weight_bytes(model)
    assert memory.gradients == head_bytes
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 4-byte step counter per tensor.
    assert memory.optimizer_states == 2 * head_bytes + 4 * 2
    assert 0 < memory.activations < 4 * 32 * 4 * 2  # only the head's input (and logits) are saved
    assert memory.peak == memory.weights + memory.gradients + memory.optimizer_states + memory.activations + memory.outputs
    # The probe steps with lr=0 and drops its gradients: the model is unchanged.
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_steady_step_time_skips_warmup():
    # Warm-up steps dropped; the lower quartile of [1, 2, 3, 2, 9] (sorted 1, 2, 2, 3, 9) is 2.
    assert steady_step_time([9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 2.0, 9.0]) == 2.0
    # A slow burst from another process moves the median, not the lower quartile.
    assert steady_step_time([9.0] * 3 + [1.0] * 6 + [5.0] * 5) == 1.0
    assert steady_step_time([5.0, 1.0]) == 2.0
    assert steady_step_time([]) is None


def test_full_checkpoint_size_is_the_file_written(tmp_path):
    model = tiny_bert_classifier()
    path = save_full_checkpoint(model, tmp_path / "full")
    assert path.stat().st_size >= weight_bytes(model) - sum(b.numel() * b.element_size() for b in model.buffers())
    assert storage_bytes([torch.zeros(3), torch.zeros(5)]) == 32


# ---------------------------------------------------------------- methods and settings
def test_method_settings_take_registered_defaults_and_overrides():
    lora = method_settings("lora", {"r": 2}, lr=3e-3)
    assert lora.lr == 3e-3 and lora.config_fields["r"] == 2
    assert method_settings("full").config_fields == {}
    with pytest.raises(ValueError, match="Unknown field"):
        method_settings("lora", {"rank": 2})


def test_unknown_method_lists_available_and_trains_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown method 'lroa'.*Did you mean lora.*Available methods: full, .*lora"):
        validate_methods(["full", "lroa"])
    with pytest.raises(ValueError, match="Available methods"):
        run_tiny(tmp_path, methods="full,nosuch")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the whole run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("compare"))


def test_compare_measures_every_method(tiny_run):
    results = json.loads((tiny_run.output_dir / "results.json").read_text())
    assert results["status"] == "completed"
    full, lora = results["methods"]["full"], results["methods"]["lora"]
    assert full["status"] == lora["status"] == "ok"
    assert full["parameters"]["percent"] == 100.0
    assert 0 < lora["parameters"]["trainable"] < full["parameters"]["trainable"]
    for record in (full, lora):
        memory = MemoryBreakdown.from_dict(record["memory"])
        assert memory.weights > 0 and memory.activations > 0 and memory.peak == record["memory"]["peak"]
        assert len(record["losses"]) == 6 and record["time"]["step_s"] > 0
        assert 0.0 <= record["quality"]["in_domain"]["accuracy"] <= 1.0
        assert record["forgetting"]["before"] == 1.0
    # LoRA keeps gradients and AdamW states only for its few parameters.
    assert lora["memory"]["optimizer_states"] < 0.2 * full["memory"]["optimizer_states"]
    assert lora["memory"]["gradients"] < 0.2 * full["memory"]["gradients"]
    assert lora["storage"]["bytes"] < full["storage"]["bytes"]
    assert Path(lora["storage"]["path"], "adapter_model.safetensors").is_file()
    assert full["storage"]["path"] is None  # the full copy is deleted unless keep_checkpoints
    # After training, the trained models were timed in interleaved rounds; ratios within rounds.
    assert results["timing"]["rounds"] == 5 and full["time"]["interleaved"]["ratio"] == 1.0
    rounds = lora["time"]["interleaved"]
    assert len(rounds["round_step_s"]) == 5 and rounds["ratio_low"] <= rounds["ratio"] <= rounds["ratio_high"]


def test_compare_estimate_agrees_with_measurement(tiny_run):
    for name in ("full", "lora"):
        error = tiny_run.methods[name]["estimate_error_percent"]["peak"]
        assert abs(error) < 15.0, (name, error)


def test_compare_writes_report_table_and_plots(tiny_run):
    names = {p.name for p in tiny_run.files}
    assert {"results.json", "report.md", "memory_breakdown.png", "storage_tasks.png", "quality_vs_params.png", "loss_curves.png"} <= names
    for path in tiny_run.files:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tiny_run.output_dir / "report.md").read_text()
    assert "## Memory (MiB)" in report and "## Estimate vs measurement" in report and "| lora |" in report
    table = render_table(tiny_run.results)
    assert "full" in table and "lora" in table and "W/G/O/A" in table


def test_storage_for_n_tasks_is_base_plus_adapters(tiny_run):
    results = tiny_run.results
    full_bytes = results["methods"]["full"]["storage"]["bytes"]
    adapter = results["methods"]["lora"]["storage"]["bytes"]
    assert storage_for_tasks(results, "full", 100) == 100 * full_bytes
    assert storage_for_tasks(results, "lora", 100) == results["base_model_bytes"] + 100 * adapter


def test_headline_checks_are_computed_from_the_run(tiny_run):
    checks = {name: (value, passed) for name, value, passed in headline_checks(tiny_run.results)}
    percent = tiny_run.methods["lora"]["parameters"]["percent"]
    assert checks["lora trains < 1% of the parameters"] == (f"{percent:.3f}%", percent < 1.0)


def test_nan_loss_is_recorded_and_other_methods_still_run(tmp_path):
    run = run_tiny(tmp_path, lrs={"full": 1e30, "lora": 1e-2}, report=False)
    full, lora = run.methods["full"], run.methods["lora"]
    assert full["status"] == "failed" and "NaN" in full["error"]
    assert "memory" in full  # measured before the failure, kept
    assert lora["status"] == "ok"
    saved = json.loads((run.output_dir / "results.json").read_text())
    assert saved["methods"]["full"]["status"] == "failed"
    assert "## Failures" in render_markdown(saved)


def test_interrupt_keeps_results_of_finished_methods(tmp_path, monkeypatch):
    from deltatune.compare import runner

    original = runner._Comparison._train

    def interrupt_on_lora(self, model, settings, record):
        if settings.name == "lora":
            raise KeyboardInterrupt
        return original(self, model, settings, record)

    monkeypatch.setattr(runner._Comparison, "_train", interrupt_on_lora)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "interrupted"
    assert saved["methods"]["full"]["status"] == "ok"
    assert saved["methods"]["lora"]["status"] == "interrupted"
    assert (tmp_path / "run" / "report.md").is_file()


def test_task_data_error_stops_before_training_with_its_message(tmp_path):
    task = TinyTask(fail_train_data="train_file has no column 'text'; columns: review, rating")
    with pytest.raises(ValueError, match="no column 'text'"):
        run_tiny(tmp_path, task=task)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "failed" and "no column 'text'" in saved["error"]
    assert saved["methods"] == {}


def test_unwritable_output_folder_is_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="Cannot write to the output folder .*--output"):
        compare(TinyTask(), "full", output_dir=blocker / "run", console=None, progress=False)


def test_results_file_is_replaced_atomically(tmp_path):
    results = ResultsFile(tmp_path / "results.json", {"methods": {}})
    results.save()
    results.data["methods"]["x"] = {"status": "ok"}
    results.save()
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["x"]["status"] == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_all_runs_every_registered_method_and_presets_skip_unregistered(monkeypatch):
    from deltatune.compare import runner
    from deltatune.compare.presets import RUN_PRESETS, RunPreset

    every = runner.resolve_settings("tiny", "all", "default", None, None, None, None, 0, "cpu", 100, False, None)
    standalone = [m for m in dt.available_methods() if dt.method_info(m).standalone]
    assert every.methods == ["full", *standalone]
    assert "fusion" in dt.available_methods() and "fusion" not in standalone  # it needs trained adapters
    monkeypatch.setitem(RUN_PRESETS, "quick", RunPreset("quick", 5, 8, None, None, ("full", "lora", "not-registered"), "test"))
    quick = runner.resolve_settings("tiny", None, "quick", None, None, None, None, 0, "cpu", 100, False, None)
    assert quick.methods == ["full", "lora"] and quick.max_steps == 5


class TinyLanguageTask:
    """A causal-LM task on a 2-layer Llama: repeat a short token cycle; quality is perplexity."""

    name = "tiny-lm"
    kind = "causal_lm"
    num_labels = None
    label_names = None
    head_modules: list[str] = []

    def load_model(self):
        from conftest import tiny_llama

        return tiny_llama(layers=2, hidden=32), None

    def _blocks(self, count: int, seed: int) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        blocks = []
        for _ in range(count):
            start = int(torch.randint(0, 20, (1,), generator=generator))
            ids = (torch.arange(16) % 5) + start
            blocks.append({"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": ids.clone()})
        return blocks

    def train_data(self, tokenizer, limit=None):
        return self._blocks(limit or 64, seed=1)

    def collate(self, examples):
        return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}

    def eval_splits(self):
        return {"in_domain": "held-out cycles", "forgetting": "other cycles"}

    def evaluate(self, model, tokenizer, split, limit=None, batch_size=64):
        model.eval()
        batch = self.collate(self._blocks(16, seed=2 if split == "in_domain" else 3))
        with torch.no_grad():
            loss = float(model(**batch).loss)
        result = {"perplexity": float(torch.exp(torch.tensor(loss))), "loss": loss, "n": 16}
        return {"metric": "perplexity", **result} if split == "forgetting" else result


def test_causal_language_model_task_reports_perplexity(tmp_path):
    run = compare(TinyLanguageTask(), "full,lora", output_dir=tmp_path / "lm", max_steps=3, batch_size=8, train_limit=64,
                  progress=False, console=None, lrs={"full": 1e-3, "lora": 1e-2})
    for name in ("full", "lora"):
        record = run.methods[name]
        assert record["status"] == "ok", record.get("error")
        assert record["quality"]["in_domain"]["perplexity"] > 1.0
        assert record["forgetting"]["metric"] == "perplexity"
        assert abs(record["estimate_error_percent"]["peak"]) < 15.0
    table = render_table(run.results)
    assert "ppl " in table and "ppl 1" in render_markdown(run.results)


def test_busy_machine_makes_the_report_warn_about_timings():
    from deltatune.compare.report import busy_machine_warning

    quiet = {"environment": {"cpu_count": 2, "load_average_start": 0.3, "load_average_end": 2.1}}
    busy = {"environment": {"cpu_count": 2, "load_average_start": 0.3, "load_average_end": 7.5}}
    assert busy_machine_warning(quiet) == ""
    assert "load average up to 7.5 on 2 CPUs" in busy_machine_warning(busy)
    # A neighbour arrived while the second method trained: the load changed, the report says so
    # and points at the interleaved ratios.
    changed = {"environment": {"cpu_count": 2, "load_average_start": 1.9, "load_average_end": 2.2},
               "methods": {"full": {"time": {"load_average": [1.9, 1.8]}},
                           "lora": {"time": {"load_average": [1.8, 2.6], "interleaved": {"ratio": 0.6}}}},
               "timing": {"load_before": 2.8, "load_after": 2.9}}
    warning = busy_machine_warning(changed)
    assert "load changed during the run (from 1.8 to 2.9)" in warning and "interleaved ratios" in warning
    assert "busy" not in warning


def test_quantize_puts_peft_bases_in_4_bits_and_keeps_the_full_baseline(tmp_path):
    run = run_tiny(tmp_path, "full,lora,qlora", quantize="nf4", lrs={"full": 1e-3, "lora": 1e-2, "qlora": 1e-2})
    full, lora, qlora = (run.methods[name] for name in ("full", "lora", "qlora"))
    assert run.results["settings"]["quantize"] == "nf4"
    assert full["base_storage"]["quant_type"] is None and full["base_storage"]["linear_bytes_per_param"] == 4.0
    for record in (lora, qlora):
        assert record["status"] == "ok", record.get("error")
        assert record["base_storage"]["quant_type"] == "nf4"
        assert 0.5 < record["base_storage"]["linear_bytes_per_param"] < 0.6
        # 4-bit weights sit in buffers, yet they are the same base parameters as full's.
        assert record["parameters"]["total"] - record["parameters"]["trainable"] <= full["parameters"]["total"]
        assert record["parameters"]["total"] >= full["parameters"]["total"]
    assert lora["memory"]["weights"] < 0.75 * full["memory"]["weights"]  # embeddings stay in float32
    table = render_table(run.results)
    assert "base B/w" in table and "nf4" in table and "full FT in full precision" in table


def test_method_settings_check_the_quantize_option():
    with pytest.raises(ValueError, match="cannot train a nf4"):
        method_settings("full", quantize="nf4")
    assert method_settings("full", quantize="nf4", quantize_full="keep").quantize is None
    with pytest.raises(ValueError, match="nf4, fp4, int4"):
        method_settings("lora", quantize="nf3")
    assert method_settings("qlora", quantize="int4").config_fields["quant_type"] == "int4"
    assert method_settings("qlora").quantize == "nf4"  # qlora's own default type


def test_seeds_report_mean_and_std_and_each_seed_is_the_run_of_that_seed(tmp_path):
    import statistics

    from deltatune.compare.report import render_markdown, render_table, split_metric

    run = run_tiny(tmp_path / "three", seeds=3)
    assert run.results["settings"]["seeds"] == 3
    for name in ("full", "lora"):
        record = run.methods[name]
        assert [r["seed"] for r in record["seed_runs"]] == [0, 1, 2]
        accuracies = [r["quality"]["in_domain"]["accuracy"] for r in record["seed_runs"]]
        assert record["seed_runs"][0]["quality"] == record["quality"]  # the first seed is the measured model
        metric, mean, std = split_metric(record, "in_domain")
        assert metric == "accuracy" and mean == statistics.fmean(accuracies) and std == statistics.stdev(accuracies)
        changes = [r["forgetting"]["change"] for r in record["seed_runs"]]
        assert len(changes) == 3 and all(c is not None for c in changes)
    # Seed 1 inside the three-seed run is exactly what a run with --seed 1 gets.
    alone = run_tiny(tmp_path / "seed1", seed=1)

    def scores(quality):  # everything but the evaluation's own wall time
        return {split: {k: v for k, v in metrics.items() if k != "seconds"} for split, metrics in quality.items()}

    for name in ("full", "lora"):
        assert scores(run.methods[name]["seed_runs"][1]["quality"]) == scores(alone.methods[name]["quality"])
        assert run.methods[name]["seed_runs"][1]["losses"] == alone.methods[name]["losses"]
    lora_losses = [r["losses"] for r in run.methods["lora"]["seed_runs"]]
    assert lora_losses[0] != lora_losses[1]  # the seed changes the run
    table = render_table(run.results)
    assert "seeds 0-2 (quality: mean ± std)" in table and "±" in table
    assert "mean ± sample std over the seeds" in render_markdown(run.results)
    assert (run.output_dir / "quality_vs_params.png").stat().st_size > 0


def test_seeds_must_be_a_positive_whole_number(tmp_path):
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="seeds"):
            run_tiny(tmp_path, seeds=bad)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_forgetting_curves_are_measured_during_training_and_read_at_matched_quality(tmp_path):
    run = run_tiny(tmp_path / "curves", max_steps=9, curve_points=2)
    for name in ("full", "lora"):
        record = run.methods[name]
        curve = record["forgetting_curve"]
        assert [point["step"] for point in curve] == [0, 3, 6, 9]
        assert curve[0]["forgetting"]["value"] == run.results["base_quality"]["forgetting"]["accuracy"]
        assert curve[-1]["in_domain"]["value"] == record["quality"]["in_domain"]["accuracy"]
        assert curve[-1]["forgetting"]["value"] == record["quality"]["forgetting"]["accuracy"]
        assert record["time"]["curve_eval_s"] > 0  # measured, and kept out of train s
    report = (run.output_dir / "report.md").read_text()
    assert "## Forgetting at matched quality" in report
    assert (run.output_dir / "forgetting_curve.png").stat().st_size > 0
    none = run_tiny(tmp_path / "none", curve_points=0)
    assert "forgetting_curve" not in none.methods["lora"] and not (none.output_dir / "forgetting_curve.png").exists()
    with pytest.raises(ValueError, match="curve_points must be at least 0"):
        run_tiny(tmp_path / "bad", curve_points=-1)
