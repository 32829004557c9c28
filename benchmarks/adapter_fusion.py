"""AdapterFusion on real data: a tweet-sentiment adapter and a drug-review adapter, fused.

    python benchmarks/adapter_fusion.py                    # about 1,050 CPU-seconds: ~9 minutes on 2 free cores
    python benchmarks/adapter_fusion.py --adapter-steps 60 --fusion-steps 60 --eval-size 200

The embedded all-MiniLM-L6-v2 encoder (frozen), three labels (negative / neutral / positive) in
both domains:

* adapter "tweets": a Pfeiffer bottleneck adapter plus its own head, trained on the sentiment
  task's training tweets;
* adapter "drugs": the same on drug reviews (deltatune.train.tasks.load_drug_reviews(), 979
  reviews); a seed-fixed `--eval-size` of them is held out and never trained on;
* fusion: FusionConfig(adapters=["tweets", "drugs"]) plus a fresh head, trained with both
  adapters frozen on a mixed set: all training drug reviews and as many training tweets.

Each is evaluated on `--eval-size` held-out tweets (the task's test split) and as many held-out
drug reviews; "mixed" is the accuracy over both (equal parts). The majority-class row predicts the
most frequent label of the respective training set. The last table gives the fusion's mean
attention weight on each adapter (over sites and non-padding tokens) per domain: a fusion that
routes puts more weight on the tweet adapter for tweets than for drug reviews.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

import deltatune as dt
from deltatune.methods.adapters import BottleneckConfig
from deltatune.methods.adapters.fusion import AdapterAttention, FusionConfig
from deltatune.train import TrainConfig, get_task, train
from deltatune.train.data import PadCollator, classification_dataset, pad_token_id_of
from deltatune.train.tasks import (
    evaluation_mode,
    length_sorted_batches,
    load_drug_reviews,
)

HEAD = ["classifier"]
ADAPTERS = ("tweets", "drugs")


@dataclass
class Splits:
    train: dict[str, list[dict]]  # domain -> tokenised examples
    test: dict[str, list[dict]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter-steps", type=int, default=80, help="optimizer steps per single adapter")
    parser.add_argument("--fusion-steps", type=int, default=80, help="optimizer steps of the fusion")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter-lr", type=float, default=2e-3)
    parser.add_argument("--fusion-lr", type=float, default=2e-3)
    parser.add_argument("--reduction-factor", type=int, default=16, help="adapter width = 384 // this")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out examples per domain")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def load_splits(tokenizer, args: argparse.Namespace, tweet_task) -> Splits:
    def encode(texts: list[str], labels: list[int]) -> list[dict]:
        return classification_dataset(tokenizer, texts, labels, args.max_length).examples

    tweet_test = tweet_task.splits.evaluation["in_domain"]
    reviews = load_drug_reviews()
    order = list(range(len(reviews.texts)))
    random.Random(args.seed).shuffle(order)
    held_out, training = order[: args.eval_size], order[args.eval_size :]
    drugs_train = encode([reviews.texts[i] for i in training], [reviews.label_ids[i] for i in training])
    drugs_test = encode([reviews.texts[i] for i in held_out], [reviews.label_ids[i] for i in held_out])
    return Splits(
        train={"tweets": tweet_task.train_data(tokenizer).examples, "drugs": drugs_train},
        test={"tweets": encode(tweet_test.texts[: args.eval_size], tweet_test.label_ids[: args.eval_size]), "drugs": drugs_test},
    )


def fit(model: dt.DeltaModel, examples: list[dict], steps: int, lr: float, args: argparse.Namespace, collate) -> tuple[float, float]:
    """Train the active adapter; (wall seconds, CPU seconds of this process)."""
    config = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed, progress=False, log_every=0, device="cpu")
    cpu_started = time.process_time()
    result = train(model, examples, config, collate_fn=collate)
    return result.total_time, time.process_time() - cpu_started


def predictions(model: nn.Module, examples: list[dict], collate) -> list[int]:
    predicted = [0] * len(examples)
    with evaluation_mode(model):
        for indices in length_sorted_batches(examples, 64):
            batch = collate([examples[i] for i in indices])
            batch.pop("labels")
            for index, label in zip(indices, model(**batch).logits.argmax(-1).tolist()):
                predicted[index] = label
    return predicted


def accuracies(model: nn.Module, splits: Splits, collate) -> dict[str, float]:
    correct = {}
    for domain, examples in splits.test.items():
        gold = [int(e["labels"]) for e in examples]
        correct[domain] = sum(p == g for p, g in zip(predictions(model, examples, collate), gold))
    scores = {domain: correct[domain] / len(splits.test[domain]) for domain in splits.test}
    scores["mixed"] = sum(correct.values()) / sum(len(e) for e in splits.test.values())
    return scores


def majority_scores(splits: Splits) -> dict[str, dict[str, float]]:
    rows = {}
    for source, examples in splits.train.items():
        majority = Counter(int(e["labels"]) for e in examples).most_common(1)[0][0]
        correct = {d: sum(int(e["labels"]) == majority for e in ex) for d, ex in splits.test.items()}
        row = {d: correct[d] / len(splits.test[d]) for d in splits.test}
        row["mixed"] = sum(correct.values()) / sum(len(e) for e in splits.test.values())
        rows[f"majority class of {source} (train)"] = row
    return rows


def attention_by_domain(model: dt.DeltaModel, splits: Splits, collate) -> dict[str, list[float]]:
    """Mean fusion weight per adapter over sites and non-padding tokens, for each test domain."""
    sums, mask = {}, {}

    def record(module: AdapterAttention, inputs: tuple, _output) -> None:
        weights = module.attention_weights(*inputs)  # (batch, length, adapters)
        tokens = mask["current"].unsqueeze(-1).to(weights.dtype)
        sums["weights"] = sums.get("weights", 0) + (weights * tokens).sum(dim=(0, 1))
        sums["count"] = sums.get("count", 0) + tokens.sum()

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, AdapterAttention)]
    result = {}
    try:
        with evaluation_mode(model):
            for domain, examples in splits.test.items():
                sums.clear()
                for indices in length_sorted_batches(examples, 64):
                    batch = collate([examples[i] for i in indices])
                    batch.pop("labels")
                    mask["current"] = batch["attention_mask"]
                    model(**batch)
                result[domain] = (sums["weights"] / sums["count"]).tolist()
    finally:
        for hook in hooks:
            hook.remove()
    return result


def print_table(rows: dict[str, dict[str, float]], domains: list[str]) -> None:
    columns = [*domains, "mixed"]
    width = max(len(name) for name in rows) + 2
    print(f"{'model':<{width}}" + "".join(f"{c:>10}" for c in columns))
    for name, scores in rows.items():
        print(f"{name:<{width}}" + "".join(f"{scores[c]:>10.3f}" for c in columns))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = get_task("sentiment", max_length=args.max_length, probe_size=0, seed=args.seed)
    base, tokenizer = task.load_model()
    collate = PadCollator(pad_token_id_of(tokenizer))
    splits = load_splits(tokenizer, args, task)
    print(f"train: {len(splits.train['tweets'])} tweets, {len(splits.train['drugs'])} drug reviews; "
          f"test: {len(splits.test['tweets'])} tweets, {len(splits.test['drugs'])} drug reviews")

    adapter = BottleneckConfig(placement="pfeiffer", reduction_factor=args.reduction_factor, modules_to_save=HEAD)
    model = dt.wrap(base, adapter, adapter_name="tweets")
    seconds = {"tweets": fit(model, splits.train["tweets"], args.adapter_steps, args.adapter_lr, args, collate)}
    model.add_adapter("drugs", adapter, activate=True)
    seconds["drugs"] = fit(model, splits.train["drugs"], args.adapter_steps, args.adapter_lr, args, collate)

    model.add_adapter("fusion", FusionConfig(adapters=list(ADAPTERS), modules_to_save=HEAD), activate=True)
    mixed = splits.train["drugs"] + splits.train["tweets"][: len(splits.train["drugs"])]
    print(f"fusion: {model.trainable_parameters()}; mixed train set: {len(mixed)} examples")
    seconds["fusion"] = fit(model, mixed, args.fusion_steps, args.fusion_lr, args, collate)

    rows = majority_scores(splits)
    for name, label in (("tweets", "adapter 1 (tweets) alone"), ("drugs", "adapter 2 (drug reviews) alone"), ("fusion", "fusion of 1 + 2")):
        model.set_adapter(name)
        rows[label] = accuracies(model, splits, collate)
    print()
    print_table(rows, list(splits.test))
    weights = attention_by_domain(model, splits, collate)
    print()
    print(f"fusion attention (mean weight on {' / '.join(ADAPTERS)}):")
    for domain, values in weights.items():
        print(f"  on {domain:<7} test inputs: " + " / ".join(f"{v:.3f}" for v in values))
    print()
    # CPU seconds as well as wall seconds: wall time grows when other programs share the cores.
    print("training seconds (wall / CPU): " + ", ".join(f"{k} {wall:.0f} / {cpu:.0f}" for k, (wall, cpu) in seconds.items())
          + f"; total {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU "
          f"({args.adapter_steps} steps per adapter, {args.fusion_steps} fusion steps, batch {args.batch_size}, "
          f"{args.max_length} tokens)")


if __name__ == "__main__":
    main()
