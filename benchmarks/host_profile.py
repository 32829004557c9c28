"""Where the host spends one training step: Python's profile of the ordinary `labels=` step.

    PYTHONPATH=src python3 benchmarks/host_profile.py --run qwen2-1.5b

A step whose "host ms" (benchmarks/train_throughput.py) reaches its step time is bound by Python
and kernel launches; this lists the functions that take the host's time (own time first), after
the GPU has drained, so the host never waits on it except where the step itself synchronises.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
import train_throughput as tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="qwen2-1.5b", choices=sorted(tt.RUNS))
    parser.add_argument("--rows", type=int, default=35)
    args = parser.parse_args()
    shape_key, checkpointing = tt.RUNS[args.run]
    shape = tt.SHAPES[shape_key]
    model = tt.build_model(shape, 0)
    wrapped, _, optimizer, _ = tt.setup_deltatune(model, checkpointing, 0, fused_loss=False)
    input_ids = tt.make_batch(shape, 1)

    def step() -> None:
        tt.hf_loss(wrapped, input_ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    for _ in range(3):
        torch.cuda.synchronize()
        profiler.enable()
        step()
        profiler.disable()
    torch.cuda.synchronize()
    print(f"{shape.name}, checkpointing {'on' if checkpointing else 'off'}: 3 steps")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
