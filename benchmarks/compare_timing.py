"""Does a neighbour's load bias compare's step-time ratios? Two runs of `deltatune compare`, side by side:
one on an idle machine, one with a CPU hog (busy processes, one per core) started when the second
method begins training, i.e. halfway through. Printed per PEFT method: its step-time ratio to full
fine-tuning measured during training (each method in its own stretch of time) and from the
interleaved rounds, in both runs, and how far each moved.

    PYTHONPATH=src python3 benchmarks/compare_timing.py                  # compare --quick: full, lora, bitfit
    PYTHONPATH=src python3 benchmarks/compare_timing.py --max-steps 30   # shorter
    PYTHONPATH=src python3 benchmarks/compare_timing.py --default        # the README's main command (2 x ~12 min)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from typing import Any


def _burn(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


def run(hog: bool, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    from deltatune.compare import compare
    from deltatune.compare.report import busy_machine_warning, ratio

    hogs: list[multiprocessing.Process] = []

    def console(message: str) -> None:
        print(("  [hog] " if hog else "  [idle] ") + message, flush=True)
        if hog and message.startswith("[2/") and not hogs:  # the second method starts: load arrives
            for _ in range(os.cpu_count() or 2):
                process = multiprocessing.Process(target=_burn, args=(time.time() + 3600,), daemon=True)
                process.start()
                hogs.append(process)

    try:
        result = compare(args.task, args.methods, quick=not args.default, max_steps=args.max_steps, output_dir=folder,
                         progress=False, console=console, report=bool(args.output))
    finally:
        for process in hogs:
            process.terminate()
    methods = result.methods
    full = methods["full"]["time"]
    print(f"  clock of the rounds: {result.results['timing'].get('clock')}; warning: "
          f"{busy_machine_warning(result.results).strip() or 'none'}", flush=True)
    out = {}
    for name, record in methods.items():
        if name == "full" or record.get("status") != "ok":
            continue
        rounds = record["time"].get("interleaved", {})
        out[name] = {"during_training": ratio(record["time"]["step_s"], full["step_s"]), "interleaved": rounds.get("ratio"),
                     "low": rounds.get("ratio_low"), "high": rounds.get("ratio_high")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--methods", help="default: the preset's (quick: full,lora,bitfit)")
    parser.add_argument("--default", action="store_true", help="the default preset (`deltatune compare`), not --quick")
    parser.add_argument("--output", help="keep both runs (results, report.md, plots) under OUTPUT/idle and OUTPUT/hog")
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output or scratch
        started = time.perf_counter()
        idle = run(False, args, os.path.join(folder, "idle"))
        print(f"  [idle] the whole run: {time.perf_counter() - started:.0f} s", flush=True)
        busy = run(True, args, os.path.join(folder, "hog"))
    print(f"\nstep time / full fine-tuning's ({os.cpu_count()} CPUs; hog: {os.cpu_count()} busy processes from the "
          "second method on)")
    print(f"{'method':<10} {'idle: training':>15} {'hog: training':>14} {'moved':>7} {'idle: rounds':>13} "
          f"{'hog: rounds':>12} {'moved':>7}")
    for name in idle:
        a, b = idle[name], busy.get(name, {})
        moved = lambda key: f"{b[key] - a[key]:+.2f}" if a.get(key) and b.get(key) else "-"  # noqa: E731
        print(f"{name:<10} {a['during_training']:>14.2f}x {b.get('during_training', 0):>13.2f}x {moved('during_training'):>7} "
              f"{a['interleaved']:>12.2f}x {b.get('interleaved', 0):>11.2f}x {moved('interleaved'):>7}")


if __name__ == "__main__":
    main()
