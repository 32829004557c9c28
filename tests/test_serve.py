"""`deltatune serve`: a real HTTP server on a loopback socket, batching requests across adapters.

Every test starts uvicorn in a background thread on a free port and talks to it with http.client;
each answer is checked against the same adapter run alone (one prompt, set_adapter) on a
separate copy of the base model.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapters, tiny_llama

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import deltatune as dt
from deltatune.cli import EXIT_USAGE, main
from deltatune.serve import create_app, serving_in_background

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # LlamaConfig's bos/eos ids, so generation stops where the tokenizer expects
VOCAB = 101  # tiny_llama's vocabulary size: the tokenizer must name every id the model can produce
WORDS = [f"w{i}" for i in range(4, VOCAB)]
ADAPTERS = ["a0", "a1", "a2", "a3"]
BATCHING = ["whole", "continuous"]  # the server's two ways of batching requests: each must answer as a single run does


# ---------------------------------------------------------------- model, tokenizer, adapters
def tiny_tokenizer():
    """A word-level tokenizer over exactly the model's 101 ids, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": PAD, "<s>": BOS, "</s>": EOS, "[UNK]": UNK, **{w: i for i, w in enumerate(WORDS, start=4)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def save_lora(directory: Path, seed: int, **options: Any) -> dt.DeltaModel:
    """A LoRA adapter with random weights (so every adapter changes the output differently)."""
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **options))
    randomize_adapters(model, seed=seed, scale=0.5)
    model.save(directory)
    return model


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        save_lora(root / name, seed=seed + 10)
    return root


def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))


def trim_at_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def run_alone(adapters_dir: Path, tokenizer, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the server should answer: each request generated on its own, without padding or
    batching, on a fresh copy of the base with its adapter made the active one."""
    model = dt.DeltaModel(tiny_llama())
    for name in sorted({r["adapter"] for r in requests if r["adapter"] is not None}):
        model.load_adapter(adapters_dir / name, adapter_name=name)
    answers = []
    for request in requests:
        ids = torch.tensor([tokenizer(request["prompt"])["input_ids"]])
        kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": request["max_new_tokens"], "do_sample": False, "pad_token_id": PAD}
        with torch.no_grad(), (model.disable_adapters() if request["adapter"] is None else contextlib.nullcontext()):
            if request["adapter"] is not None:
                model.set_adapter(request["adapter"])
            tokens = trim_at_eos(model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist())
        answers.append({"adapter": request["adapter"], "text": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens)})
    return answers


# ---------------------------------------------------------------- a server on a real socket
running_server = serving_in_background  # the library's own helper, on a free loopback port


def request(port: int, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload is not None else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def generate(port: int, body: dict) -> tuple[int, dict]:
    return request(port, "POST", "/generate", body)


def generate_concurrently(port: int, bodies: list[dict]) -> list[tuple[int, dict]]:
    """Send all requests at once (a barrier releases every thread together)."""
    barrier = threading.Barrier(len(bodies))

    def send(body: dict) -> tuple[int, dict]:
        barrier.wait()
        return generate(port, body)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(send, bodies))


def random_requests(count: int, adapters: list[str | None], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"adapter": adapters[i % len(adapters)], "prompt": prompt_text(rng), "max_new_tokens": rng.randint(2, 8)}
        for i in range(count)
    ]


# ---------------------------------------------------------------- tests
def test_unknown_adapter_is_404_listing_the_known_ones(adapters_dir, tokenizer):
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir)) as port:
        status, body = generate(port, {"adapter": "nope", "prompt": "w5 w6"})
        assert status == 404
        assert body["known"] == ADAPTERS and "nope" in body["error"] and "a0" in body["error"]
        # A name that climbs out of the adapters folder is just another unknown adapter.
        assert generate(port, {"adapter": "../a0", "prompt": "w5"})[0] == 404


def test_only_adapter_folders_directly_in_the_folder_are_known(adapters_dir, tmp_path):
    from deltatune.serve.adapters import AdapterPool, UnknownAdapterError
    from deltatune.serve.metrics import Metrics

    root = tmp_path / "adapters"
    shutil.copytree(adapters_dir, root)
    shutil.copytree(root / "a1", root / "a0" / "nested" / "a1")  # an adapter, but two folders down
    shutil.copytree(root / "a1", root / ".hidden")
    (root / "empty").mkdir()
    (root / "a file").write_text("not a folder")
    pool = AdapterPool(dt.DeltaModel(tiny_llama()).eval(), root, max_resident=2, metrics=Metrics())
    for name in ADAPTERS:
        pool.check_known(name)
    for name in ["nope", "../adapters/a0", "a0/nested/a1", "a0/", "/a0", ".", "..", "", ".hidden", "empty",
                 "a file", "a0\0", "__base__"]:
        with pytest.raises(UnknownAdapterError) as caught:
            pool.check_known(name)
        assert caught.value.known == ADAPTERS, name


def test_malformed_requests_are_400_with_a_reason(adapters_dir, tokenizer):
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir, max_new_tokens=8)) as port:
        status, body = request(port, "POST", "/generate", b'{"adapter": "a0", "prompt": ')
        assert status == 400 and "not valid JSON" in body["error"]
        status, body = generate(port, {"adapter": "a0"})
        assert status == 400 and "prompt" in body["error"] and "Field required" in body["error"]
        status, body = generate(port, {"adapter": "a0", "prompt": "w5", "max_new_tokens": "5"})
        assert status == 400 and "max_new_tokens" in body["error"]
        status, body = generate(port, {"adapter": "a0", "prompt": "w5", "max_new_tokens": 9})
        assert status == 400 and "between 1 and 8" in body["error"]
        status, body = generate(port, {"adapter": "a0", "prompt": "w5", "temperature": 0.7})
        assert status == 400 and "temperature" in body["error"]
        status, body = generate(port, {"adapter": "a0", "prompt": "   "})
        assert status == 400 and "empty" in body["error"]
        status, body = request(port, "POST", "/generate", b"[1, 2]")
        assert status == 400
        # The server is still up and answers a good request.
        assert generate(port, {"adapter": "a0", "prompt": "w5 w9", "max_new_tokens": 2})[0] == 200


@pytest.mark.parametrize("batching", BATCHING)
def test_concurrent_requests_across_adapters_run_in_mixed_batches(adapters_dir, tokenizer, batching):
    bodies = random_requests(50, ADAPTERS, seed=0)
    app = create_app(tiny_llama(), tokenizer, adapters_dir, max_batch=16, batch_wait_ms=200, max_resident=4, batching=batching)
    with running_server(app) as port:
        answers = generate_concurrently(port, bodies)
        _, metrics = request(port, "GET", "/metrics")
        _, listed = request(port, "GET", "/adapters")
    assert [status for status, _ in answers] == [200] * 50
    expected = run_alone(adapters_dir, tokenizer, bodies)
    assert [body for _, body in answers] == expected
    same_prompt = [{"adapter": name, "prompt": "w4 w5 w6", "max_new_tokens": 8} for name in ADAPTERS]
    assert len({a["text"] for a in run_alone(adapters_dir, tokenizer, same_prompt)}) > 1, "adapters must differ"
    assert all(body["tokens"] <= request_["max_new_tokens"] for (_, body), request_ in zip(answers, bodies))

    per_adapter = metrics["adapters"]
    assert sorted(per_adapter) == ADAPTERS
    assert all(per_adapter[name]["requests"] == per_adapter[name]["completed"] == 50 // 4 + (name in ("a0", "a1")) for name in ADAPTERS)
    assert metrics["total_requests"] == metrics["total_completed"] == 50 and metrics["total_errors"] == 0
    assert metrics["total_tokens"] == sum(body["tokens"] for _, body in answers)
    assert metrics["mean_batch_size"] * metrics["batches"] == pytest.approx(50)
    assert metrics["batches"] < 50 and metrics["max_batch_size"] <= 16
    assert metrics["mixed_batches"] >= 1 and metrics["max_adapters_in_batch"] > 1
    assert metrics["total_loads"] == 4 and metrics["total_evictions"] == 0
    assert metrics["prefill_seconds"] > 0 and metrics["graph_captures"] == metrics["prefill_graph_captures"] == 0  # CPU
    assert metrics["decode_device_seconds"] == metrics["prefill_device_seconds"] == 0  # measured on CUDA only
    assert (metrics["decode_seconds"] > 0) == (batching == "continuous")
    assert listed == {"known": ADAPTERS, "resident": listed["resident"], "max_resident": 4}
    assert sorted(listed["resident"]) == ADAPTERS


@pytest.mark.parametrize("batching", BATCHING)
def test_base_rows_share_a_batch_with_adapter_rows(adapters_dir, tokenizer, batching):
    bodies = random_requests(8, [None, "a2"], seed=1)
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir, batch_wait_ms=200, batching=batching)) as port:
        answers = generate_concurrently(port, bodies)
        _, metrics = request(port, "GET", "/metrics")
    assert [body for _, body in answers] == run_alone(adapters_dir, tokenizer, bodies)
    assert metrics["adapters"]["(base)"]["completed"] == 4 and metrics["mixed_batches"] >= 1


def test_batches_decode_through_greedy_generate_and_soft_prompts_through_generate(adapters_dir, tokenizer, tmp_path,
                                                                                  monkeypatch):
    from deltatune.serve import batching

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return greedy_generate(*args, **kwargs)

    greedy_generate = batching.greedy_generate
    monkeypatch.setattr(batching, "greedy_generate", counted)
    bodies = random_requests(6, [None, "a1"], seed=3)
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir, batch_wait_ms=200, batching="whole")) as port:
        answers = generate_concurrently(port, bodies)
        _, metrics = request(port, "GET", "/metrics")
    assert [body for _, body in answers] == run_alone(adapters_dir, tokenizer, bodies)
    assert calls and sum(len(names) for names in calls) == 6  # every row decoded by it
    assert metrics["batching"] == "whole" and metrics["decode_steps"] == 0
    calls.clear()
    root = tmp_path / "prompted"
    model = dt.wrap(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4))
    randomize_adapters(model, seed=7, scale=0.5)
    model.save(root / "prompt")
    prompted = random_requests(3, ["prompt"], seed=4)
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=100, batching="whole")) as port:
        answers = generate_concurrently(port, prompted)
    assert [body for _, body in answers] == run_alone(root, tokenizer, prompted) and calls == []


def test_requests_join_a_running_decode_and_leave_before_a_long_one_ends(adapters_dir, tokenizer):
    # A long request decodes; short ones sent while it runs join its steps and are answered first
    # (whole batches would hold them until the long one ends). Every answer is still its own run's.
    rng = random.Random(7)
    candidates = [{"adapter": "a0", "prompt": prompt_text(rng), "max_new_tokens": 100} for _ in range(12)]
    long = next(body for body, answer in zip(candidates, run_alone(adapters_dir, tokenizer, candidates)) if answer["tokens"] == 100)
    shorts = random_requests(4, ["a1", None, "a2", "a0"], seed=8)
    app = create_app(tiny_llama(), tokenizer, adapters_dir, max_new_tokens=100, context_tokens=120, batch_wait_ms=0,
                     batching="continuous")
    finished: list[str] = []
    with running_server(app) as port, ThreadPoolExecutor(max_workers=2) as pool:
        long_answer = pool.submit(lambda: (generate(port, long), finished.append("long"))[0])
        deadline = time.monotonic() + 60
        while request(port, "GET", "/metrics")[1]["decode_steps"] == 0:  # until the long request decodes
            assert time.monotonic() < deadline, "no decode step within 60 s"
            time.sleep(0.001)
        short_answers = [generate(port, body) for body in shorts]
        finished.append("shorts")
        long_status, long_body = long_answer.result()
        _, metrics = request(port, "GET", "/metrics")
    assert finished == ["shorts", "long"]
    assert long_status == 200 and [long_body] == run_alone(adapters_dir, tokenizer, [long])
    assert [body for _, body in short_answers] == run_alone(adapters_dir, tokenizer, shorts)
    assert metrics["batching"] == "continuous" and metrics["mixed_steps"] >= 1 and metrics["max_adapters_in_step"] == 2
    assert metrics["decode_steps"] < 100 + sum(body["max_new_tokens"] for body in shorts)  # steps were shared


def test_a_busy_adapter_cannot_keep_a_rare_one_out_of_a_continuous_decode(adapters_dir, tokenizer):
    # One resident adapter, two rows: while a0 rows run, an a1 request cannot join. It is passed
    # over a few times, then nothing joins before it: the a0 rows drain and it runs long before
    # the 40 a0 requests queued behind it are done.
    app = create_app(tiny_llama(), tokenizer, adapters_dir, max_resident=1, max_batch=2, batch_wait_ms=0, batching="continuous")
    worker = app.state.service.worker
    order: list[str] = []
    futures = []
    for index in range(42):
        adapter = "a1" if index == 2 else "a0"
        future = worker.submit(adapter, [5 + index % 7, 9, 11], 2 if index == 0 else 6)  # the two rows never end together
        future.add_done_callback(lambda _, adapter=adapter: order.append(adapter))
        futures.append(future)
    worker.start()
    try:
        for future in futures:
            future.result(timeout=120)
    finally:
        worker.stop()
    assert order.index("a1") < 20, order


def test_a_failed_decode_step_fails_its_rows_and_the_server_keeps_serving(adapters_dir, tokenizer, monkeypatch):
    from deltatune.continuous import ContinuousDecoder

    step = ContinuousDecoder.step
    calls = {"n": 0}

    def failing_once(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return step(self)

    monkeypatch.setattr(ContinuousDecoder, "step", failing_once)
    bodies = [{"adapter": "a0", "prompt": "w5 w6 w7", "max_new_tokens": 8}, {"adapter": None, "prompt": "w9 w4", "max_new_tokens": 8}]
    app = create_app(tiny_llama(), tokenizer, adapters_dir, batch_wait_ms=200, batching="continuous")
    with running_server(app) as port:
        failed = generate_concurrently(port, bodies)
        later = [generate(port, body) for body in bodies]
    assert [status for status, _ in failed] == [500, 500] and all("device lost" in body["error"] for _, body in failed)
    assert later == [(200, answer) for answer in run_alone(adapters_dir, tokenizer, bodies)]


def test_a_prompt_beyond_the_context_is_400_naming_the_option(adapters_dir, tokenizer):
    app = create_app(tiny_llama(), tokenizer, adapters_dir, max_new_tokens=8, context_tokens=12, batching="continuous")
    with running_server(app) as port:
        status, body = generate(port, {"adapter": "a0", "prompt": " ".join(["w5"] * 6), "max_new_tokens": 8})
        fits = generate(port, {"adapter": "a0", "prompt": " ".join(["w5"] * 5), "max_new_tokens": 8})
    assert status == 400 and "context of 12 tokens (--context-tokens)" in body["error"]
    assert fits[0] == 200
    with pytest.raises(ValueError, match="context_tokens .* must exceed max_new_tokens"):
        create_app(tiny_llama(), tokenizer, adapters_dir, max_new_tokens=8, context_tokens=8, batching="continuous")
    with pytest.raises(ValueError, match="batching must be one of"):
        create_app(tiny_llama(), tokenizer, adapters_dir, batching="streaming")


@pytest.mark.parametrize("batching", BATCHING)
def test_a_corrupt_adapter_fails_alone(adapters_dir, tokenizer, tmp_path, batching):
    root = tmp_path / "adapters"
    for name in ("a0", "a1", "broken"):
        save_lora(root / name, seed=ADAPTERS.index(name) + 10 if name in ADAPTERS else 99)
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(b"\x07garbage, not a safetensors file" * 3)
    bodies = random_requests(12, ["a0", "broken", "a1"], seed=2)
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=200, batching=batching)) as port:
        answers = generate_concurrently(port, bodies)
        later = generate(port, {"adapter": "a1", "prompt": "w7 w8 w9", "max_new_tokens": 3})
        _, listed = request(port, "GET", "/adapters")
        _, metrics = request(port, "GET", "/metrics")
    for (status, body), sent in zip(answers, bodies):
        if sent["adapter"] == "broken":
            assert status == 422 and body["adapter"] == "broken"
            assert "'broken' cannot be loaded" in body["error"] and "corrupt" in body["error"]
        else:
            assert status == 200
    good = [(sent, body) for (_, body), sent in zip(answers, bodies) if sent["adapter"] != "broken"]
    assert [body for _, body in good] == run_alone(root, tokenizer, [sent for sent, _ in good])
    assert later[0] == 200
    assert "broken" in listed["known"] and "broken" not in listed["resident"]
    assert metrics["adapters"]["broken"]["errors"] == 4 and metrics["adapters"]["broken"]["load_failures"] >= 1


@pytest.mark.parametrize("batching", BATCHING)
def test_least_recently_used_adapters_are_evicted(adapters_dir, tokenizer, batching):
    app = create_app(tiny_llama(), tokenizer, adapters_dir, max_resident=2, batch_wait_ms=200, batching=batching)
    names = ["a0", "a1", "a2"]
    sequential = random_requests(6, names, seed=3)  # a0 a1 a2 a0 a1 a2: every request after the second evicts
    concurrent = random_requests(15, names, seed=4)
    with running_server(app) as port:
        first = [generate(port, body) for body in sequential]
        _, after_sequential = request(port, "GET", "/adapters")
        second = generate_concurrently(port, concurrent)
        _, metrics = request(port, "GET", "/metrics")
    assert [status for status, _ in first + second] == [200] * 21
    assert [body for _, body in first] == run_alone(adapters_dir, tokenizer, sequential)
    assert [body for _, body in second] == run_alone(adapters_dir, tokenizer, concurrent)
    assert after_sequential["resident"] == ["a1", "a2"]  # least recently used first
    assert metrics["total_evictions"] >= 4 and metrics["total_loads"] == metrics["total_evictions"] + len(metrics["resident"])
    assert len(metrics["resident"]) <= 2 and metrics["max_adapters_in_batch"] <= 2


@pytest.mark.parametrize("batching", BATCHING)
def test_adapters_of_a_method_without_per_row_routing_run_one_group_at_a_time(tokenizer, tmp_path, caplog, batching):
    caplog.set_level(logging.INFO, logger="deltatune.serve")
    root = tmp_path / "adapters"
    # Partial fine-tuning copies whole blocks, so it cannot share a block with LoRA: block 0 is LoRA's.
    save_lora(root / "lora", seed=5, layers_to_transform=[0])
    partial = dt.wrap(tiny_llama(), dt.make_config("partial", last_k_layers=1))
    randomize_adapters(partial, seed=6, scale=0.05)
    partial.save(root / "partial")
    bodies = random_requests(8, ["lora", "partial", None], seed=5)
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=200, batching=batching)) as port:
        answers = generate_concurrently(port, bodies)
    assert [status for status, _ in answers] == [200] * 8
    assert [body for _, body in answers] == run_alone(root, tokenizer, bodies)
    assert "running one adapter at a time" in caplog.text


@pytest.mark.parametrize("batching", BATCHING)
def test_soft_prompt_adapters_are_served_like_a_single_run(tokenizer, tmp_path, batching):
    """Prefix tuning and prompt tuning reach generate() through the model's key/value cache, whose
    argument transformers renamed in 5.24: the server answers them as a single uncached run does."""
    root = tmp_path / "adapters"
    for name, config in (("prefix", dt.PrefixTuningConfig(num_virtual_tokens=4)),
                         ("prompt", dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="sample_vocab"))):
        model = dt.wrap(tiny_llama(), config)
        randomize_adapters(model, seed=7, scale=0.5)
        model.save(root / name)
    bodies = random_requests(6, ["prefix", "prompt", None], seed=9)
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=100, batching=batching)) as port:
        answers = generate_concurrently(port, bodies)
    assert [status for status, _ in answers] == [200] * 6, answers
    assert [body for _, body in answers] == run_alone(root, tokenizer, bodies)


def test_health_and_create_app_arguments(adapters_dir, tokenizer, tmp_path):
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir)) as port:
        assert request(port, "GET", "/health") == (200, {"status": "ok"})
    with pytest.raises(ValueError, match="already holds adapters"):
        create_app(dt.wrap(tiny_llama(), dt.LoraConfig(r=2)), tokenizer, adapters_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_app(tiny_llama(), tokenizer, tmp_path / "missing")
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        create_app(tiny_llama(), tokenizer, adapters_dir, max_batch=0)


def test_cli_serve_explains_a_missing_model_folder(tmp_path, capsys):
    assert main(["serve", "--base", str(tmp_path / "nothing"), "--adapters", str(tmp_path)]) == EXIT_USAGE
    assert "has no config.json" in capsys.readouterr().err


def test_cli_serve_runs_from_a_model_folder(adapters_dir, tokenizer, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    command = [sys.executable, "-m", "deltatune.cli", "serve", "--base", str(base), "--adapters", str(adapters_dir), "--port", "0", "--max-new-tokens", "4"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in process.stderr:
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "the server did not report its port"
        status, body = generate(port, {"adapter": "a3", "prompt": "w11 w12 w13"})
        assert status == 200
        assert body == run_alone(adapters_dir, tokenizer, [{"adapter": "a3", "prompt": "w11 w12 w13", "max_new_tokens": 4}])[0]
    finally:
        process.terminate()
        rest = process.communicate(timeout=60)[1]
    assert process.returncode == 0, rest
    assert "stopped" in rest


# ---------------------------------------------------------------- hostile inputs
def test_a_backtracking_pattern_fails_its_adapter_alone_and_health_keeps_answering(adapters_dir, tokenizer, tmp_path):
    root = tmp_path / "adapters"
    save_lora(root / "good", seed=1)
    evil = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=r".*q_proj"))
    evil.save(root / "evil")
    config = json.loads((root / "evil" / "adapter_config.json").read_text())
    config["target_modules"] = r"(.+)+!"  # exponential backtracking on every module name
    (root / "evil" / "adapter_config.json").write_text(json.dumps(config))
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=50)) as port:
        with ThreadPoolExecutor(4) as pool:
            bad = pool.submit(generate, port, {"adapter": "evil", "prompt": "w5 w6", "max_new_tokens": 2})
            good = pool.submit(generate, port, {"adapter": "good", "prompt": "w5 w6", "max_new_tokens": 2})
            started = time.monotonic()
            health = pool.submit(request, port, "GET", "/health")
            assert health.result()[0] == 200 and time.monotonic() - started < 1.5
            status, body = bad.result()
            assert status == 422 and "catastrophic backtracking" in body["error"]
            assert good.result()[0] == 200


def test_size_limits_answer_413_and_the_server_stays_up(adapters_dir, tokenizer):
    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir, max_prompt_chars=1000, max_body_bytes=20_000)) as port:
        status, body = generate(port, {"adapter": "a0", "prompt": "w5 " * 400})
        assert status == 413 and "1,000" in body["error"]
        status, body = request(port, "POST", "/generate", json.dumps({"prompt": "w5 " * 10_000}).encode())
        assert status == 413 and "20,000 bytes" in body["error"]
        assert generate(port, {"adapter": "a0", "prompt": "w5 w9", "max_new_tokens": 2})[0] == 200


def test_api_key_guards_every_route_but_health(adapters_dir, tokenizer):
    import http.client

    with running_server(create_app(tiny_llama(), tokenizer, adapters_dir, api_key="s3cret")) as port:
        assert request(port, "GET", "/health")[0] == 200
        status, body = generate(port, {"adapter": "a0", "prompt": "w5"})
        assert status == 401 and "API key" in body["error"]
        assert request(port, "GET", "/adapters")[0] == 401
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/generate", body=json.dumps({"adapter": "a0", "prompt": "w5", "max_new_tokens": 1}),
                           headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        assert connection.getresponse().status == 200


def test_binding_beyond_loopback_without_a_key_is_warned_about(caplog):
    from deltatune.serve.server import is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    caplog.set_level(logging.WARNING, logger="deltatune.serve")
    warn_if_exposed("127.0.0.1", None)
    warn_if_exposed("0.0.0.0", "key")
    assert not caplog.records
    warn_if_exposed("0.0.0.0", None)
    assert "without an API key" in caplog.text


def test_configs_of_wrong_types_or_deep_nesting_fail_their_adapter_alone(tokenizer, tmp_path):
    root = tmp_path / "adapters"
    for name in ("good", "typed", "nested"):
        save_lora(root / name, seed=len(name))
    typed = json.loads((root / "typed" / "adapter_config.json").read_text())
    typed["r"] = {"not": "a number"}
    (root / "typed" / "adapter_config.json").write_text(json.dumps(typed))
    (root / "nested" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    bodies = [{"adapter": name, "prompt": "w5 w6", "max_new_tokens": 2} for name in ("good", "typed", "nested", "good")]
    with running_server(create_app(tiny_llama(), tokenizer, root, batch_wait_ms=200)) as port:
        answers = generate_concurrently(port, bodies)
    assert [status for status, _ in answers] == [200, 422, 422, 200]
    assert "r" in answers[1][1]["error"] and "JSON" in answers[2][1]["error"]


def test_a_folder_named_like_the_base_is_not_an_adapter(adapters_dir, tokenizer, tmp_path):
    root = tmp_path / "adapters"
    save_lora(root / "__base__", seed=3)
    save_lora(root / "real", seed=4)
    with running_server(create_app(tiny_llama(), tokenizer, root)) as port:
        assert request(port, "GET", "/adapters")[1]["known"] == ["real"]
        status, body = generate(port, {"adapter": "__base__", "prompt": "w5"})
        assert status == 404 and body["known"] == ["real"]


@pytest.mark.parametrize("batching", BATCHING)
def test_an_adapter_replaced_on_disk_while_served_answers_from_one_version_at_a_time(tokenizer, tmp_path, batching):
    """One adapter resident at a time forces reloads while another thread keeps re-saving "a"."""
    root, versions = tmp_path / "adapters", tmp_path / "versions"
    # The versions differ in their config too (rsLoRA's scaling), so a config read from one save
    # with weights from the other would answer differently from both.
    save_lora(versions / "v1", seed=21)
    save_lora(versions / "v2", seed=22, use_rslora=True)
    save_lora(root / "other", seed=23)
    save_lora(root / "a", seed=21)
    bodies = [{"adapter": "a" if i % 2 == 0 else "other", "prompt": "w5 w6 w7", "max_new_tokens": 3} for i in range(40)]
    expected = {name: run_alone(versions, tokenizer, [{**bodies[0], "adapter": name}])[0]["text"] for name in ("v1", "v2")}
    assert expected["v1"] != expected["v2"]
    stop = threading.Event()

    def keep_replacing():
        models = {name: dt.load(tiny_llama(), versions / name) for name in ("v1", "v2")}
        while not stop.is_set():
            for name in ("v2", "v1"):
                models[name].save(root / "a")

    writer = threading.Thread(target=keep_replacing)
    with running_server(create_app(tiny_llama(), tokenizer, root, max_resident=1, batch_wait_ms=0, batching=batching)) as port:
        writer.start()
        try:
            answers = [generate(port, body) for body in bodies]
        finally:
            stop.set()
            writer.join()
    texts = [body["text"] for (status, body), sent in zip(answers, bodies) if sent["adapter"] == "a"]
    assert all(status == 200 for status, _ in answers)
    assert set(texts) <= set(expected.values()), "an answer came from a mix of two saves"


def test_the_pool_holds_adapters_in_the_base_dtype(adapters_dir):
    """A bf16 base serves its adapters in bf16 (float32 ones would cast every layer's input up
    and back in a mixed batch); a float32 base keeps float32."""
    from deltatune.serve.adapters import AdapterPool
    from deltatune.serve.metrics import Metrics

    for dtype in (torch.bfloat16, torch.float32):
        model = dt.DeltaModel(tiny_llama().to(dtype)).eval()
        pool = AdapterPool(model, adapters_dir, max_resident=2, metrics=Metrics())
        assert pool.prepare([ADAPTERS[0]]) == {}
        assert {t.dtype for t in model.adapter_state_dict(ADAPTERS[0]).values()} == {dtype}
