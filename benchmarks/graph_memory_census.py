"""Diagnostic. `census`: what a QLoRA step finds allocated between steps that is not a parameter,
buffer, optimizer state or block-graph buffer, by Python allocation site (stream, pool).
`peak`: the peak from a fresh start (capturing steps included), a steady step's, the peak after
releasing the graphs and capturing again (recaptured_peak), and whether releasing the graphs leaves
pool segments behind.
Usage (CUDA): PYTHONPATH=src python benchmarks/graph_memory_census.py 1b 4 peak"""
import collections
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlora_throughput as q  # noqa: E402
from _common import DeviceMemoryTrace, train_step  # noqa: E402


from deltatune.kernels import release_block_graphs  # noqa: E402
from deltatune.kernels.cuda_graph import graph_pool_segments  # noqa: E402
from deltatune.kernels.patch import _model_graphs  # noqa: E402

MiB = 2**20


def recaptured_peak(model, loss_fn, optimizer, input_ids, steps: int) -> int:
    """The peak over `steps` steps after releasing the graphs (measurements kept) and capturing
    again: how the throughput benchmarks measured a row's peak until 2026-12-03."""
    release_block_graphs(model, keep_measurements=True)
    torch.cuda.empty_cache()
    with DeviceMemoryTrace() as recorded:
        for _ in range(steps):
            train_step(model, loss_fn, optimizer, input_ids)
    return recorded.peak()[0]


def census(wrapped, opt) -> None:
    known: set[int] = set()

    def mark(tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                known.add(t.untyped_storage().data_ptr())

    mark(wrapped.parameters())
    mark(wrapped.buffers())
    mark(v for s in opt.state.values() for v in s.values())
    mark(t for g in _model_graphs(wrapped) for t in (*g.buffers.values(), *g.warmed.values()))
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    sites, counts = collections.Counter(), collections.Counter()
    for seg in snap["segments"]:
        pool = tuple(seg.get("segment_pool_id", ()))
        for block in seg["blocks"]:
            if block["state"] != "active_allocated" or block["address"] in known:
                continue
            frames = block.get("frames", [])
            py = [f for f in frames if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
            tp = [f for f in frames if f["filename"].endswith(".py")]
            if py:
                f = py[0]
                site = f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
                if len(py) > 1:
                    site += f" < {os.path.basename(py[1]['filename'])}:{py[1]['line']} {py[1]['name']}"
            elif tp:
                site = "torch " + " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in tp[:3])
            else:
                site = "no python frame: " + " < ".join(f["name"][:50] for f in frames[:3])
            site += f" [stream {seg.get('stream')}, pool {pool}, {block['size'] / MiB:.1f}]"
            sites[site] += block["size"]
            counts[site] += 1
    print(f"allocated {torch.cuda.memory_allocated() / MiB:,.1f} MiB; not params/buffers/optimizer/graph buffers: "
          f"{sum(sites.values()) / MiB:,.1f} MiB")
    for site, size in sites.most_common(25):
        print(f"{size / MiB:10,.1f} MiB {counts[site]:4} x {site}")


def main() -> None:
    shape_key, batch, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if what == "census":
        torch.cuda.memory._record_memory_history(max_entries=3_000_000, context="all", stacks="python")
    dev = torch.device("cuda")
    shape = q.SHAPES[shape_key]
    wrapped, loss_fn, _ = q.setup_deltatune(q.build_model(shape, 0, dev), 0)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = q.make_batch(shape, batch, 0, dev)
    torch.cuda.synchronize()
    print(f"== {shape_key} b{batch} {what}")
    if what == "census":
        for _ in range(4):
            train_step(wrapped, loss_fn, opt, ids)
        census(wrapped, opt)
        return
    with DeviceMemoryTrace() as fresh:
        for _ in range(4):
            train_step(wrapped, loss_fn, opt, ids)
    print(f"fresh 4 steps peak {fresh.peak()[0] / MiB:,.0f} MiB at event {fresh.peak()[1]} of {len(fresh.trace)}")
    with DeviceMemoryTrace() as steady:
        train_step(wrapped, loss_fn, opt, ids)
    print(f"steady step peak {steady.peak()[0] / MiB:,.0f} MiB; pools {sum(s for s, _ in graph_pool_segments().values()) / MiB:,.0f} MiB")
    release_block_graphs(wrapped, keep_measurements=True)
    torch.cuda.empty_cache()
    left = sum(s for s, _ in graph_pool_segments().values())
    gc.collect()
    torch.cuda.empty_cache()
    print(f"after release: pool segments {left / MiB:,.0f} MiB; after gc.collect {sum(s for s, _ in graph_pool_segments().values()) / MiB:,.0f} MiB")
    print(f"released and captured again, 4 steps: {recaptured_peak(wrapped, loss_fn, opt, ids, 4) / MiB:,.0f} MiB")


if __name__ == "__main__":
    main()
