"""Load on `deltatune serve` over loopback, with an adapter replaced and another corrupted mid-run.

    python benchmarks/serve_load.py [--requests 1000] [--clients 50] [--adapters 8] [--batching continuous whole]

Each batching mode serves the same requests in turn (continuous: requests join and leave the
running decode between steps; whole: one generate() per gathered batch), and the ratio of the two
is printed last.

A tiny Llama built from a config and LoRA adapters with random weights (no download). Clients
send greedy requests over the adapters and the base while one adapter folder is re-saved with
another version and another one's weights are truncated. Every answer is checked against the
same request run alone on a fresh model: an answer for the replaced adapter must equal the old
version's or the new one's (never a mix), the corrupted one may only fail with 422, and /health
is polled throughout. Prints requests/s, latency percentiles, answers by kind and /health's
slowest reply. Bounded: stops by itself (--max-seconds).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

import deltatune as dt
from deltatune.serve import create_app, serving_in_background

VOCAB = 101
WORDS = [f"w{i}" for i in range(4, VOCAB)]


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i for i, w in enumerate(WORDS, start=4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def save_lora(base: torch.nn.Module, folder: Path, seed: int) -> None:
    model = dt.wrap(base, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save(folder)
    model.unwrap()


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


def reference(folder: Path | None, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The request run alone: a fresh model, no batching, no padding."""
    model = dt.DeltaModel(tiny_llama()) if folder is None else dt.load(tiny_llama(), folder)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, ids.shape[1]:].tolist()
    tokens = tokens[: tokens.index(2) + 1] if 2 in tokens else tokens
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-resident", type=int, default=4, help="fewer than --adapters: loads and evictions go on")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    parser.add_argument("--batching", nargs="+", choices=["continuous", "whole"], default=["continuous", "whole"],
                        help="the server's batching modes to run, one after the other on the same requests")
    parser.add_argument("--max-seconds", type=float, default=300, help="per mode")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.getLogger("deltatune.serve").setLevel(logging.ERROR)  # the expected load failures, counted below
    rng = random.Random(0)
    tokenizer = word_tokenizer()
    with TemporaryDirectory() as tmp:
        pristine, versions = Path(tmp) / "adapters", Path(tmp) / "versions"
        names = [f"a{i}" for i in range(args.adapters)]
        for index, name in enumerate(names):
            save_lora(tiny_llama(), pristine / name, seed=100 + index)
        save_lora(tiny_llama(), versions / "old", seed=101)
        save_lora(tiny_llama(), versions / "new", seed=999)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(16)]
        bodies = [{"adapter": rng.choice([*names, None]), "prompt": rng.choice(prompts),
                   "max_new_tokens": rng.randint(1, args.max_new_tokens)} for _ in range(args.requests)]
        expected = references(bodies, pristine, versions, replaced=names[1], tokenizer=tokenizer)
        results = {}
        for mode in args.batching:
            root = Path(tmp) / f"served-{mode}"
            shutil.copytree(pristine, root)
            results[mode] = run_load(mode, root, versions, names, bodies, expected, tokenizer, args)
    if len(results) == 2:
        continuous, whole = results["continuous"], results["whole"]
        print(f"continuous / whole: throughput {continuous['throughput'] / whole['throughput']:.2f}x, "
              f"p50 latency {continuous['p50'] / whole['p50']:.2f}x, p99 latency {continuous['p99'] / whole['p99']:.2f}x")
    return 0 if all(r["ok"] for r in results.values()) else 1


def client_process(port: int, bodies: list[dict], clients: int, max_seconds: float, root: str, versions: str,
                   replaced: str, corrupted: str, results_file: str) -> None:
    """Send every request from `clients` threads (replacing one adapter and corrupting another on
    disk on the way) while polling /health; write (index, status, text, seconds) per request."""
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
            dt.load(tiny_llama(), versions_dir / "new").save(root_dir / replaced)  # a new version, on disk, while served
        if index == len(bodies) // 2:
            weights = root_dir / corrupted / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
        try:
            status, answer, seconds = call(port, "POST", "/generate", bodies[index])
        except OSError as err:
            answers.append((index, None, type(err).__name__, 0.0))
            return
        answers.append((index, status, answer.get("text"), seconds))

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(len(bodies))))
    elapsed = time.perf_counter() - started
    done.set()
    poller.join()
    Path(results_file).write_text(json.dumps({"answers": answers, "unsent": unsent, "health": health,
                                              "health_failures": health_failures, "elapsed": elapsed}))


def references(bodies: list[dict], root: Path, versions: Path, replaced: str, tokenizer) -> dict[tuple, set[str]]:
    """Each distinct request's right answers (the replaced adapter's: either version's)."""
    print(f"references: {len({(b['adapter'], b['prompt'], b['max_new_tokens']) for b in bodies})} distinct requests run alone ...",
          flush=True)
    expected: dict[tuple, set[str]] = {}
    for body in bodies:
        key = (body["adapter"], body["prompt"], body["max_new_tokens"])
        if key in expected:
            continue
        if body["adapter"] == replaced:
            expected[key] = {reference(versions / v, tokenizer, body["prompt"], body["max_new_tokens"]) for v in ("old", "new")}
        else:
            folder = None if body["adapter"] is None else root / body["adapter"]
            expected[key] = {reference(folder, tokenizer, body["prompt"], body["max_new_tokens"])}
    return expected


def run_load(mode: str, root: Path, versions: Path, names: list[str], bodies: list[dict], expected: dict[tuple, set[str]],
             tokenizer, args: argparse.Namespace) -> dict:
    replaced, corrupted = names[1], names[2]
    app = create_app(tiny_llama(), tokenizer, root, max_resident=args.max_resident, batch_wait_ms=5,
                     max_new_tokens=args.max_new_tokens, batching=mode)
    # The clients run in a process of their own, as a server's clients do: in this one they would
    # take the interpreter lock from the decoding thread between its operations.
    results_file = root.parent / f"client-results-{mode}.json"
    with serving_in_background(app) as port:
        clients = multiprocessing.get_context("spawn").Process(target=client_process, args=(
            port, bodies, args.clients, args.max_seconds, str(root), str(versions), replaced, corrupted, str(results_file)))
        clients.start()
        clients.join()
        metrics = call(port, "GET", "/metrics")[1]
    if clients.exitcode != 0:
        raise RuntimeError(f"the client process failed (exit code {clients.exitcode})")
    results = json.loads(results_file.read_text())
    outcomes: Counter = Counter(results["unsent"])
    latencies: list[float] = []
    for index, status, text, seconds in results["answers"]:
        body = bodies[index]
        if status is None:
            outcomes[f"lost ({text})"] += 1
            continue
        latencies.append(seconds)
        if status == 200:
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
    print(f"{args.requests} requests of 1..{args.max_new_tokens} new tokens, {args.clients} clients, {args.adapters} adapters "
          f"(max resident {args.max_resident}), {replaced} replaced at request {args.requests // 3}, "
          f"{corrupted} corrupted at {args.requests // 2}")
    print(f"throughput: {answered / elapsed:.1f} requests/s over {elapsed:.1f} s")
    print(f"latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    for kind, count in sorted(outcomes.items()):
        print(f"  {kind}: {count}")
    print(f"/health: {len(health)} polls, {health_failures} failed, slowest {max(health) * 1000:.0f} ms")
    steps = f", {metrics['decode_steps']} decode steps of {metrics['mean_rows_per_step']:.1f} rows" if metrics.get("decode_steps") else ""
    print(f"server: {metrics.get('total_loads')} loads, {metrics.get('total_evictions')} evictions, "
          f"{metrics.get('batches')} batches of {metrics.get('mean_batch_size', 0):.1f}{steps}")
    bad = sum(c for k, c in outcomes.items() if k not in ("ok", "422 corrupted adapter (expected)"))
    ok = not bad and not health_failures
    print("result: " + ("every answer checked out" if ok else f"{bad} bad answers, {health_failures} health failures"))
    return {"throughput": answered / elapsed, "p50": p50, "p99": p99, "ok": ok}


if __name__ == "__main__":
    sys.exit(main())
