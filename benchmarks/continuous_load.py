"""The continuous decoder under a server's arrivals, in one process: what the server's worker
could do without HTTP, tokenizing or other threads beside it.

    python benchmarks/continuous_load.py [--device cuda] [--adapters 32] [--requests 1000] [--build server]

The requests are those of benchmarks/serve_load.py (an adapter or the base each, prompts of 3-9
tokens, 1..--max-new-tokens new tokens), all waiting from the start; they join the running decode
by the server's rule (deltatune.serve.continuous: once a quarter of the rows is free, or every few
steps) and the decoder steps until every one has ended. A first pass over a few requests warms it
up (on CUDA: captures the step and prefill shapes). Prints generated tokens/s, the admissions
(count, joiners, time) and the steps (count, median time), and the CUDA graph captures.

--build bench: the model of benchmarks/multi_adapter.py (fused=False, everything cast to the
dtype); server: as `deltatune serve` builds it (fused="auto", adapters loaded in the base's dtype).
Compare its tokens/s with serve_load.py's on the same machine to see what the server around the
decoder costs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from multi_adapter import LORA_RANK, SHAPES, build_base, load_deltatune, save_adapters, synchronize  # this script's folder

from deltatune.continuous import ContinuousDecoder, DecodeRequest
from deltatune.serve.continuous import JOIN_EVERY_STEPS, free_rows_to_join


def build_model(build: str, base: torch.nn.Module, paths: list[Path], dtype: torch.dtype) -> torch.nn.Module:
    """bench: multi_adapter.py's model; server: as `deltatune serve` builds it."""
    if build == "bench":
        return load_deltatune(base, paths, dtype)
    import deltatune as dt
    from deltatune.serve.adapters import compute_dtype

    model = dt.DeltaModel(base).eval()
    for path in paths:  # as the server's AdapterPool loads them
        model.load_adapter(path, path.name, activate=False, dtype=compute_dtype(model))
    return model


def serve_requests(decoder: ContinuousDecoder, requests: list[DecodeRequest], device: torch.device) -> dict:
    """Every request decoded, joining by the server's rule; the figures of the run."""
    waiting, generated, since_join = list(requests), 0, 0
    admissions, joiners, steps = [], [], []
    join_rows = free_rows_to_join(decoder.rows)
    started = time.perf_counter()
    while waiting or decoder.active:
        free = decoder.free_rows
        if waiting and free and (not decoder.active or free >= join_rows or since_join >= JOIN_EVERY_STEPS):
            joining: list[DecodeRequest] = []
            for request in waiting[:free]:
                if not decoder.fits(joining + [request]):
                    break
                joining.append(request)
            if joining:
                del waiting[: len(joining)]
                began = time.perf_counter()
                finished = decoder.admit(joining)
                synchronize(device)
                admissions.append(time.perf_counter() - began)
                joiners.append(len(joining))
                generated += sum(len(tokens) for _, tokens in finished)
                since_join = 0
        if decoder.active:
            began = time.perf_counter()
            generated += sum(len(tokens) for _, tokens in decoder.step())  # step() reads its tokens back: synchronized
            steps.append(time.perf_counter() - began)
            since_join += 1
    seconds = time.perf_counter() - started
    return {"tokens": generated, "seconds": seconds, "admissions": admissions, "joiners": joiners, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: cpu on CPU, 1b on CUDA")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=32, help="rows decoded at once (the server's --max-batch)")
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--build", default="server", choices=["bench", "server"])
    parser.add_argument("--warmup-requests", type=int, default=100)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = SHAPES[args.shape or ("1b" if device.type == "cuda" else "cpu")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_base(shape, device, dtype, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        paths = save_adapters(base, args.adapters, Path(folder), seed=0, b_std=0.05 / (LORA_RANK * shape.hidden / 256) ** 0.5)
        model = build_model(args.build, base, paths, dtype)
    del base
    rng = random.Random(0)
    names = [path.name for path in paths] + [None]
    requests = [DecodeRequest(rng.choice(names), [rng.randrange(4, shape.vocab) for _ in range(rng.randint(3, 9))],
                              rng.randint(1, args.max_new_tokens)) for _ in range(args.warmup_requests + args.requests)]
    decoder = ContinuousDecoder(model, rows=args.rows, context=args.context_tokens)
    with torch.inference_mode():
        serve_requests(decoder, requests[: args.warmup_requests], device)
        captured = (decoder.captures, decoder.prefill_captures)
        device_before = (decoder.step_device_seconds, decoder.prefill_device_seconds)
        run = serve_requests(decoder, requests[args.warmup_requests:], device)
    admissions, steps = run["admissions"], run["steps"]
    print(f"{shape.name}, {args.build} build, {args.adapters} adapters, {args.requests} requests of 1..{args.max_new_tokens} "
          f"new tokens, {args.rows} rows, context {args.context_tokens}, on {device.type}")
    print(f"generated {run['tokens']:,} tokens in {run['seconds']:.2f} s: {run['tokens'] / run['seconds']:,.0f} tokens/s")
    print(f"admissions: {len(admissions)} of {statistics.mean(run['joiners']):.1f} joiners, {sum(admissions):.2f} s, "
          f"median {1e3 * statistics.median(admissions):.1f} ms; steps: {len(steps)}, {sum(steps):.2f} s, "
          f"median {1e3 * statistics.median(steps):.2f} ms")
    if device.type == "cuda":
        print(f"device time: steps {decoder.step_device_seconds - device_before[0]:.2f} s, "
              f"prefills {decoder.prefill_device_seconds - device_before[1]:.2f} s")
    print(f"CUDA graph captures after the warm-up: {decoder.captures - captured[0]} of the step, "
          f"{decoder.prefill_captures - captured[1]} of prefill shapes ({len(decoder.prefill_shapes)} shapes met)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
