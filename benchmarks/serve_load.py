"""Load on `deltatune serve` over loopback, with an adapter replaced and another corrupted mid-run.

    python benchmarks/serve_load.py [--requests 1000] [--clients 50] [--adapters 8] [--batching continuous whole]
    python benchmarks/serve_load.py --device cuda --shape 1b --adapters 32 --max-resident 32 --clients 64 \
        --max-batch 32 --max-new-tokens 64 --context-tokens 256

Each batching mode serves the same requests in turn (continuous: requests join and leave the
running decode between steps; whole: one generate() per gathered batch), and the ratio of the two
is printed last. Before timing, a warm-up sends --warmup-rounds requests for every adapter and the
base (a warm server: adapters resident, CUDA graphs captured); the server's figures printed are
those of the timed part.

A Llama built from a config (`--shape tiny`: 2 layers of 64, the default; `1b`: the 1B shape of
benchmarks/multi_adapter.py, bf16 on CUDA, LoRA r=16 on all seven projections) and LoRA adapters
with random weights (no download), behind a word-level tokenizer over the model's vocabulary. Clients
send greedy requests over the adapters and the base while one adapter folder is re-saved with
another version and another one's weights are truncated. Every answer is checked against the
same request run alone on a fresh model: an answer for the replaced adapter must equal the old
version's or the new one's (never a mix), the corrupted one may only fail with 422, and /health
is polled throughout. Prints requests/s, generated tokens/s, latency percentiles, answers by kind
and /health's slowest reply. Bounded: stops by itself (--max-seconds).

On CUDA (bf16) the answers are not checked against requests run alone: a random-init model's greedy
choices are near-ties that bf16 rounding decides differently in different batch shapes (the CPU
run, float32, checks every answer; tests/test_continuous.py checks the CUDA graphs against eager steps).
"""

from __future__ import annotations

import argparse
import os
import http.client
import json
import logging
import multiprocessing
import random
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

import deltatune as dt
from deltatune.serve import create_app, serving_in_background
from multi_adapter import LORA_RANK, TARGET_MODULES, Shape  # this script's folder: the shapes are shared
from multi_adapter import SHAPES as MODEL_SHAPES



@dataclass(frozen=True)
class ServedShape(Shape):
    """A model shape of benchmarks/multi_adapter.py and the LoRA adapters served over it."""

    rank: int = LORA_RANK
    targets: tuple[str, ...] = tuple(TARGET_MODULES)


SHAPES = {
    "tiny": ServedShape("tiny", 64, 2, 128, 4, 2, vocab=101, rank=4, targets=("q_proj", "v_proj", "down_proj")),
    "1b": ServedShape(**asdict(MODEL_SHAPES["1b"])),  # r=16 on all seven projections, as multi_adapter.py
}
EOS = 2


def build_base(shape: Shape, device: str = "cpu") -> torch.nn.Module:
    """The base model, the same random weights on every call (bf16 on CUDA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    model = LlamaForCausalLM(config).eval()
    return model.to(device, torch.bfloat16) if device == "cuda" else model


def words(shape: Shape) -> list[str]:
    return [f"w{i}" for i in range(4, shape.vocab)]


def word_tokenizer(shape: Shape):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i for i, w in enumerate(words(shape), start=4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def save_lora(base: torch.nn.Module, shape: Shape, folder: Path, seed: int) -> None:
    model = dt.wrap(base, dt.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(shape.targets)))
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 * (4 * 64 / (shape.rank * shape.hidden)) ** 0.5  # 0.5 on the tiny shape; outputs move alike on larger ones
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save(folder)
    model.unwrap()


def replace_adapter_files(source: Path, target: Path) -> None:
    """Put another saved version in `target` while it is served: the config first, then the weights
    (each renamed into place). The weights carry their own config, so a reader between the two
    renames still reads one version whole (deltatune.io)."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        staged = target.parent / f".{target.name}.{name}.staged"
        shutil.copyfile(source / name, staged)
        os.replace(staged, target / name)


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, float]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), time.perf_counter() - started
    finally:
        connection.close()


def reference(shape: Shape, folder: Path | None, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The request run alone: a fresh model, no batching, no padding."""
    model = dt.DeltaModel(build_base(shape)) if folder is None else dt.load(build_base(shape), folder)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, ids.shape[1]:].tolist()
    tokens = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-resident", type=int, default=4, help="fewer than --adapters: loads and evictions go on")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="each request asks for --min-new-tokens..this many tokens")
    parser.add_argument("--min-new-tokens", type=int, default=1,
                        help="the fewest new tokens a request asks for (= --max-new-tokens: every request as long, as in "
                             "benchmarks/multi_adapter.py's batch)")
    parser.add_argument("--batching", nargs="+", choices=["continuous", "whole"], default=["continuous", "whole"],
                        help="the server's batching modes to run, one after the other on the same requests")
    parser.add_argument("--max-seconds", type=float, default=300, help="per mode")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (rows decoded at once)")
    parser.add_argument("--context-tokens", type=int, default=2048, help="the server's --context-tokens")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="before timing, this many requests per adapter and the base (loads them; on CUDA, captures "
                             "the decode step and prefill shapes); not counted")
    args = parser.parse_args(argv)
    if not 1 <= args.min_new_tokens <= args.max_new_tokens:
        parser.error(f"--min-new-tokens must be 1..--max-new-tokens ({args.max_new_tokens}), got {args.min_new_tokens}")
    if args.device == "cpu":
        torch.set_num_threads(2)
    logging.getLogger("deltatune.serve").setLevel(logging.ERROR)  # the expected load failures, counted below
    rng = random.Random(0)
    shape = SHAPES[args.shape]
    tokenizer = word_tokenizer(shape)
    with TemporaryDirectory() as tmp:
        pristine, versions = Path(tmp) / "adapters", Path(tmp) / "versions"
        names = [f"a{i}" for i in range(args.adapters)]
        base = build_base(shape)
        for index, name in enumerate(names):
            save_lora(base, shape, pristine / name, seed=100 + index)
        save_lora(base, shape, versions / "old", seed=101)
        save_lora(base, shape, versions / "new", seed=999)
        del base
        vocabulary = words(shape)
        prompts = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(2, 8))) for _ in range(16)]
        bodies = [{"adapter": rng.choice([*names, None]), "prompt": rng.choice(prompts),
                   "max_new_tokens": rng.randint(args.min_new_tokens, args.max_new_tokens)} for _ in range(args.requests)]
        warmup = [{"adapter": name, "prompt": rng.choice(prompts), "max_new_tokens": rng.randint(args.min_new_tokens, args.max_new_tokens)}
                  for _ in range(args.warmup_rounds) for name in [*names, None]]
        checked = args.device == "cpu"
        expected = references(shape, bodies, pristine, versions, replaced=names[1], tokenizer=tokenizer) if checked else None
        results = {}
        for mode in args.batching:
            root = Path(tmp) / f"served-{mode}"
            shutil.copytree(pristine, root)
            results[mode] = run_load(mode, shape, root, versions, names, warmup, bodies, expected, tokenizer, args)
    if len(results) == 2:
        continuous, whole = results["continuous"], results["whole"]
        print(f"continuous / whole: throughput {continuous['throughput'] / whole['throughput']:.2f}x "
              f"(tokens/s {continuous['tokens_per_s'] / whole['tokens_per_s']:.2f}x), "
              f"p50 latency {continuous['p50'] / whole['p50']:.2f}x, p99 latency {continuous['p99'] / whole['p99']:.2f}x")
    return 0 if all(r["ok"] for r in results.values()) else 1


def client_process(port: int, warmup: list[dict], bodies: list[dict], clients: int, max_seconds: float, root: str,
                   versions: str, replaced: str, corrupted: str, results_file: str) -> None:
    """Send the warm-up requests, then every request from `clients` threads (replacing one adapter
    and corrupting another on disk on the way) while polling /health; write (index, status, text,
    seconds) per request and the server's /metrics as the timed part began."""
    root_dir, versions_dir = Path(root), Path(versions)
    answers: list[tuple] = []
    unsent: Counter = Counter()
    health: list[float] = []
    health_failures = 0
    done = threading.Event()
    deadline = time.monotonic() + max_seconds

    def poll_health() -> None:
        nonlocal health_failures
        while not done.is_set():
            try:
                status, _, seconds = call(port, "GET", "/health")
                health.append(seconds)
                health_failures += status != 200
            except OSError:
                health_failures += 1
            time.sleep(0.05)

    def send(index: int) -> None:
        if time.monotonic() > deadline:
            unsent["not sent (time limit)"] += 1
            return
        if index == len(bodies) // 3:
            replace_adapter_files(versions_dir / "new", root_dir / replaced)  # a new version, on disk, while served
        if index == len(bodies) // 2:
            weights = root_dir / corrupted / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        try:
            status, answer, seconds = call(port, "POST", "/generate", bodies[index])
        except OSError as err:
            answers.append((index, None, type(err).__name__, 0.0, 0))
            return
        answers.append((index, status, answer.get("text"), seconds, answer.get("tokens", 0)))

    with ThreadPoolExecutor(clients) as pool:  # a warm server: adapters resident, CUDA graphs captured
        warm_statuses = Counter(status for status, _, _ in pool.map(lambda body: call(port, "POST", "/generate", body), warmup))
    metrics_before = call(port, "GET", "/metrics")[1]
    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(len(bodies))))
    elapsed = time.perf_counter() - started
    done.set()
    poller.join()
    Path(results_file).write_text(json.dumps({"answers": answers, "unsent": unsent, "health": health,
                                              "health_failures": health_failures, "elapsed": elapsed,
                                              "warmup_statuses": warm_statuses, "metrics_before": metrics_before}))


def references(shape: Shape, bodies: list[dict], root: Path, versions: Path, replaced: str, tokenizer) -> dict[tuple, set[str]]:
    """Each distinct request's right answers (the replaced adapter's: either version's)."""
    print(f"references: {len({(b['adapter'], b['prompt'], b['max_new_tokens']) for b in bodies})} distinct requests run alone ...",
          flush=True)
    expected: dict[tuple, set[str]] = {}
    for body in bodies:
        key = (body["adapter"], body["prompt"], body["max_new_tokens"])
        if key in expected:
            continue
        if body["adapter"] == replaced:
            expected[key] = {reference(shape, versions / v, tokenizer, body["prompt"], body["max_new_tokens"]) for v in ("old", "new")}
        else:
            folder = None if body["adapter"] is None else root / body["adapter"]
            expected[key] = {reference(shape, folder, tokenizer, body["prompt"], body["max_new_tokens"])}
    return expected


def run_load(mode: str, shape: Shape, root: Path, versions: Path, names: list[str], warmup: list[dict], bodies: list[dict],
             expected: dict[tuple, set[str]] | None, tokenizer, args: argparse.Namespace) -> dict:
    """Serve `bodies` in batching `mode`; expected: each request's right answers (None: not checked)."""
    replaced, corrupted = names[1], names[2]
    app = create_app(build_base(shape, args.device), tokenizer, root, max_resident=args.max_resident, batch_wait_ms=5,
                     max_new_tokens=args.max_new_tokens, batching=mode, max_batch=args.max_batch,
                     context_tokens=args.context_tokens)
    # The clients run in a process of their own, as a server's clients do: in this one they would
    # take the interpreter lock from the decoding thread between its operations.
    results_file = root.parent / f"client-results-{mode}.json"
    with serving_in_background(app) as port:
        clients = multiprocessing.get_context("spawn").Process(target=client_process, args=(
            port, warmup, bodies, args.clients, args.max_seconds, str(root), str(versions), replaced, corrupted,
            str(results_file)))
        clients.start()
        clients.join()
        metrics = call(port, "GET", "/metrics")[1]
    if clients.exitcode != 0:
        raise RuntimeError(f"the client process failed (exit code {clients.exitcode})")
    results = json.loads(results_file.read_text())
    outcomes: Counter = Counter(results["unsent"])
    latencies: list[float] = []
    generated = 0
    for index, status, text, seconds, tokens in results["answers"]:
        body = bodies[index]
        if status is None:
            outcomes[f"lost ({text})"] += 1
            continue
        latencies.append(seconds)
        if status == 200:
            generated += tokens
            if expected is None:
                kind = "ok (not checked)"
            else:
                right = text in expected[(body["adapter"], body["prompt"], body["max_new_tokens"])]
                kind = "ok" if right else ("mixed versions" if body["adapter"] == replaced else "wrong answer")
        elif status == 422 and body["adapter"] == corrupted:
            kind = "422 corrupted adapter (expected)"
        else:
            kind = f"HTTP {status}"
        outcomes[kind] += 1
    health, health_failures, elapsed = results["health"], results["health_failures"], results["elapsed"]

    answered = len(latencies)
    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(0.99 * (answered - 1))]
    print(f"== batching: {mode} ({metrics.get('batching')}) ==")
    print(f"{args.requests} requests of {args.min_new_tokens}..{args.max_new_tokens} new tokens, {args.clients} clients, {args.adapters} adapters "
          f"(max resident {args.max_resident}), {replaced} replaced at request {args.requests // 3}, "
          f"{corrupted} corrupted at {args.requests // 2}")
    print(f"throughput: {answered / elapsed:.1f} requests/s, {generated / elapsed:,.0f} generated tokens/s over {elapsed:.1f} s")
    print(f"latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    for kind, count in sorted(outcomes.items()):
        print(f"  {kind}: {count}")
    print(f"/health: {len(health)} polls, {health_failures} failed, slowest {max(health) * 1000:.0f} ms")
    warm = results["warmup_statuses"]
    print(f"warm-up before timing: {sum(warm.values())} requests ({', '.join(f'HTTP {k}: {v}' for k, v in sorted(warm.items()))}), "
          f"{results['metrics_before'].get('total_loads')} loads")
    print_server_metrics(metrics, results["metrics_before"])
    bad = sum(c for k, c in outcomes.items() if k not in ("ok", "ok (not checked)", "422 corrupted adapter (expected)"))
    ok = not bad and not health_failures
    print("result: " + ("every answer checked out" if ok else f"{bad} bad answers, {health_failures} health failures"))
    return {"throughput": answered / elapsed, "tokens_per_s": generated / elapsed, "p50": p50, "p99": p99, "ok": ok}


def print_server_metrics(metrics: dict, before: dict) -> None:
    """The server's /metrics over the timed part: the end's minus the warm-up's."""
    def timed(key: str) -> float:
        return metrics.get(key, 0) - before.get(key, 0)

    steps = timed("decode_steps")
    rows = metrics.get("mean_rows_per_step", 0) * metrics.get("decode_steps", 0) - \
        before.get("mean_rows_per_step", 0) * before.get("decode_steps", 0)
    batches = timed("batches")
    batch_rows = metrics.get("mean_batch_size", 0) * metrics.get("batches", 0) - before.get("mean_batch_size", 0) * before.get("batches", 0)
    stepped = f", {steps:.0f} decode steps of {rows / steps:.1f} rows" if steps else ""
    print(f"server (timed part): {timed('total_loads'):.0f} loads, {timed('total_evictions'):.0f} evictions, "
          f"{batches:.0f} batches of {batch_rows / max(batches, 1):.1f}{stepped}")
    decode = (f", decode steps {timed('decode_seconds'):.1f} s (CUDA graph captures: {timed('graph_captures'):.0f} of the step, "
              f"{timed('prefill_graph_captures'):.0f} of prefill shapes)") if steps else ""
    print(f"worker time: {'prefills' if steps else 'generate calls'} {timed('prefill_seconds'):.1f} s{decode}")
    if timed("decode_device_seconds"):  # continuous batching on CUDA: what of it the device computed
        print(f"device time: decode steps {timed('decode_device_seconds'):.1f} s, prefills {timed('prefill_device_seconds'):.1f} s")


if __name__ == "__main__":
    sys.exit(main())
