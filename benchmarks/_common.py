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
