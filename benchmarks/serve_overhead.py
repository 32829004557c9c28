"""What the server's HTTP side costs per request: CPU time of the server process, in which the
event loop shares the interpreter lock with the decoding thread.

    python benchmarks/serve_overhead.py [--adapters 32] [--requests 1500] [--clients 8] [--repeats 2]

A tiny Llama built from a config (benchmarks/serve_load.py's `tiny` shape) serves --adapters LoRA
adapters (all resident) with continuous batching. Clients in a process of their own send
--requests requests to /health, then as many one-token /generate requests over the adapters
(the model's work is a small part of those), --repeats times in turn; the server process's CPU
seconds (user + system, all its threads) over each run are divided by its requests. Prints, per
route, the median over the repeats of requests/s and of CPU milliseconds per request. Every
request must answer 200.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from serve_load import SHAPES, build_base, call, save_lora, word_tokenizer  # this script's folder

from deltatune.serve import create_app, serving_in_background


def send_all(port: int, bodies: list[dict | None], clients: int, results: "multiprocessing.Queue") -> None:
    """Send every body (None: GET /health) from `clients` threads; put (seconds, statuses)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda body: call(port, "POST", "/generate", body)[0] if body else call(port, "GET", "/health")[0],
                                 bodies))
    results.put((time.perf_counter() - started, sorted(set(statuses))))


def measure(port: int, bodies: list[dict | None], clients: int) -> tuple[float, float]:
    """(requests/s, server CPU ms per request) of sending `bodies` from a client process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    before = resource.getrusage(resource.RUSAGE_SELF)
    process = context.Process(target=send_all, args=(port, bodies, clients, results))
    process.start()
    seconds, statuses = results.get()
    process.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    if statuses != [200]:
        raise RuntimeError(f"requests answered {statuses}, not only 200")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return len(bodies) / seconds, 1000 * cpu / len(bodies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1500, help="per route and repeat")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = SHAPES["tiny"]
    rng = random.Random(0)
    names = [f"a{i}" for i in range(args.adapters)]
    with TemporaryDirectory() as folder:
        base = build_base(shape)
        for seed, name in enumerate(names):
            save_lora(base, shape, Path(folder) / name, seed=seed)
        app = create_app(build_base(shape), word_tokenizer(shape), folder, batching="continuous", max_batch=8, context_tokens=64,
                         max_new_tokens=1, max_resident=args.adapters)
        routes: dict[str, list[dict | None]] = {
            "/health": [None] * args.requests,
            "/generate": [{"adapter": rng.choice(names), "prompt": "w5 w6 w7", "max_new_tokens": 1} for _ in range(args.requests)],
        }
        figures: dict[str, list[tuple[float, float]]] = {route: [] for route in routes}
        with serving_in_background(app) as port:
            measure(port, [{"adapter": name, "prompt": "w5 w6", "max_new_tokens": 1} for name in names] * 2, args.clients)  # loads them
            for _ in range(args.repeats):
                for route, bodies in routes.items():
                    figures[route].append(measure(port, bodies, args.clients))
    print(f"tiny Llama, {args.adapters} adapters resident, continuous batching, {args.clients} clients, "
          f"{args.requests} requests per route, median of {args.repeats}")
    for route, runs in figures.items():
        rates, cpu = zip(*runs)
        print(f"{route}: {statistics.median(rates):,.0f} requests/s, server CPU {statistics.median(cpu):.2f} ms per request "
              f"(runs: {', '.join(f'{c:.2f}' for c in cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
