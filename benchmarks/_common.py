"""Helpers the GPU benchmarks share (run as scripts, so they import this as `_common`)."""

from __future__ import annotations

import re

import torch
from torch import nn

_LORA_PARAM = re.compile(r"(layers\.\d+\.\w+\.\w+)\.lora_([AB])\b")


def set_same_lora_init(model: nn.Module, seed: int) -> int:
    """Give every adapter the same A (seeded by its module path) and B = 0, whatever the wrapper,
    so deltatune and peft start from identical adapters and their losses can be compared."""
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = _LORA_PARAM.search(name)
            if not match or not param.requires_grad:
                continue
            if match.group(2) == "B":
                param.zero_()
            else:
                gen = torch.Generator(device="cpu").manual_seed(seed + sum(map(ord, match.group(1))) * 7919)
                bound = param.shape[1] ** -0.5
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
            count += 1
    return count


def count_graph_nodes(tensor: torch.Tensor, name_prefix: str) -> int:
    """Autograd nodes behind `tensor` whose class name (leading underscores dropped) starts with
    `name_prefix`: proof of which fused paths a step really took."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__.lstrip("_").startswith(name_prefix)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def profile_steps(model, loss_fn, optimizer, input_ids, path: str, title: str, rows: int = 45) -> None:
    """Append a CUDA-time table of two training steps to `path` (optimizer None: no update)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            loss = loss_fn(model, input_ids)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"\n===== {title} (2 steps)\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))


def _allocation_site(frames: list[dict]) -> str:
    """The innermost Python frame outside torch itself: the code that asked for the memory."""
    for frame in frames:
        name = frame.get("filename", "")
        if name and "/torch/" not in name and not name.startswith("??"):
            return f"{'/'.join(name.split('/')[-2:])}:{frame.get('line')} {frame.get('name')}"
    return "(inside torch: autograd engine or optimizer)"


def memory_at_peak(model, loss_fn, optimizer, input_ids, path: str, title: str, rows: int = 25) -> None:
    """Append to `path` what is allocated at the peak of one training step, by allocation site.

    Replays the allocator's trace of one step (torch.cuda.memory._record_memory_history): memory
    held before the step is one line, everything allocated during it is grouped by the innermost
    Python frame outside torch. Graph pools' temporaries are listed apart (the trace does not see them).
    """
    from deltatune.kernels.cuda_graph import graph_pool_bytes

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    try:
        loss = loss_fn(model, input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)

    def replay(stop: int | None):
        live, held_before, total, peak, peak_at = {}, before, before, before, -1
        for index, event in enumerate(trace[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, index
            elif event["action"] == "free_completed":
                total -= event["size"]
                if live.pop(event["addr"], None) is None:
                    held_before -= event["size"]
        return live, held_before, peak, peak_at

    _, _, peak, peak_at = replay(None)
    live, held_before, _, _ = replay(peak_at + 1)
    sites: dict[str, list[int]] = {}
    for event in live.values():
        entry = sites.setdefault(_allocation_site(event.get("frames", [])), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    mib = 2**20
    lines = [f"\n===== {title}: {peak / mib:,.0f} MiB allocated at the step's peak (event {peak_at} of {len(trace)}), "
             f"plus {graph_pool_bytes() / mib:,.0f} MiB in CUDA-graph pools",
             f"{held_before / mib:>10,.1f} MiB  held since before the step (weights, optimizer state, graph buffers)"]
    for site, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(f"{size / mib:>10,.1f} MiB  {count:>5} x  {site}")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
