"""The mixed-batch LoRA kernels of one decode step (one token per row), on CUDA: time per call.

    PYTHONPATH=src python3 benchmarks/row_lora_kernels.py

For each projection shape of the 1B and 7B Llama shapes (32 rows over 32 adapters, r=16, bf16) it
prints the microseconds per call, launched 200 times in one CUDA graph as a decode step replays
them, of: the token-block kernels (tl.dot over blocks of 16 tokens, the path of prefills), the
one-token kernels with the configuration deltatune uses, and the best configuration found for
that shape; then each configuration's sum over all shapes, which chose deltatune's. Each row
also checks the one-token result against torch's (relative error of the sum, bf16 rounding).
Last, layers that read the same x (q/k/v, gate/up): a kernel pair each against one shared shrink
launch and an expand each (the results must be identical: the same sums in the same order).

Measured 2026-12-03 on the lent H200 (torch 2.11, triton 3.6; the scratch form of this script):
token-block pair 4.99 / 5.05 / 6.60 / 8.25 us on 2048->2048 / 2048->512 / 2048->8192 / 8192->2048,
one-token pair at its best configuration 4.07 / 3.84 / 4.86 / 5.34 us (7B: 6.55 -> 4.82,
8.78 -> 5.83, 10.63 -> 6.24); best sums: shrink (BLOCK_IN 128, 4 warps), expand (BLOCK_OUT 256,
1 warp), the configuration now in deltatune/kernels/_triton_kernels.py.

2026-12-03, same machine (this script as it is now): q/k/v of the 1B shape 12.30 us as three pairs,
9.16 us with the shared shrink (7B: 14.96 -> 12.76), gate/up 10.14 -> 8.45 us, results identical.
"""

from __future__ import annotations

import sys

import torch


def graph_time(fn, launches: int = 200, repeats: int = 5) -> float:
    """Microseconds per call of fn, `launches` calls captured in one CUDA graph (best of `repeats` replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / launches)
    return best


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from deltatune.kernels import _triton_kernels as kernels
    from deltatune.kernels.row_lora import row_lora_reference

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; 32 rows over 32 adapters, r=16, bf16")
    rows, rank, adapters = 32, 16, 32
    chosen_shrink, chosen_expand = kernels.ONE_TOKEN_SHRINK, kernels.ONE_TOKEN_EXPAND
    shrink_sums: dict[tuple[int, int], float] = {}
    expand_sums: dict[tuple[int, int], float] = {}
    for n_in, n_out in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (4096, 4096), (4096, 11008), (11008, 4096)]:
        x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)
        down = (torch.randn(adapters + 1, rank, n_in, device="cuda") / n_in ** 0.5).bfloat16()
        up = torch.randn(adapters + 1, rank, n_out, device="cuda", dtype=torch.bfloat16)
        down[-1], up[-1] = 0, 0
        row_slot = torch.arange(rows, device="cuda") % adapters
        y = torch.randn(rows, n_out, device="cuda", dtype=torch.bfloat16)

        def pair() -> None:
            kernels.row_lora_add_(y, x, down, up, row_slot, adapters)

        kernels.ONE_TOKEN_KERNELS = False
        token_blocks = graph_time(pair)
        kernels.ONE_TOKEN_KERNELS = True
        chosen = graph_time(pair)
        shrink, expand = {}, {}
        for block_in in (128, 256, 512, 1024):
            splits = triton.cdiv(n_in, block_in)
            partial_h = torch.empty((splits, rows, rank), dtype=torch.float32, device="cuda")
            for warps in (1, 2, 4, 8):
                shrink[(block_in, warps)] = graph_time(lambda: kernels._row_lora_shrink_one_kernel[(rows, splits, 1)](
                    x, down, down, down, partial_h, row_slot, rows, n_in, adapters, RANK=rank, BLOCK_IN=block_in, num_warps=warps))
        splits = triton.cdiv(n_in, chosen_shrink[0])
        partial_h = torch.zeros((splits, rows, rank), dtype=torch.float32, device="cuda")
        for block_out in (128, 256, 512, 1024):
            for warps in (1, 2, 4, 8):
                expand[(block_out, warps)] = graph_time(lambda: kernels._row_lora_expand_one_kernel[(rows, triton.cdiv(n_out, block_out))](
                    partial_h, up, y, row_slot, rows, splits, n_out, adapters, rank, RANK=rank, SPLITS=triton.next_power_of_2(splits),
                    BLOCK_OUT=block_out, num_warps=warps))
        for config, micros in shrink.items():
            shrink_sums[config] = shrink_sums.get(config, 0.0) + micros
        for config, micros in expand.items():
            expand_sums[config] = expand_sums.get(config, 0.0) + micros
        best_shrink, best_expand = min(shrink, key=shrink.get), min(expand, key=expand.get)
        kernels.ONE_TOKEN_SHRINK, kernels.ONE_TOKEN_EXPAND = best_shrink, best_expand
        best = graph_time(pair)
        kernels.ONE_TOKEN_SHRINK, kernels.ONE_TOKEN_EXPAND = chosen_shrink, chosen_expand
        fresh = torch.randn_like(y)
        expected = fresh.float() + row_lora_reference(x[:, None].float(), down.float(), up.float(), row_slot)[:, 0]
        kernels.row_lora_add_(fresh, x, down, up, row_slot, adapters)
        error = ((fresh.float() - expected).norm() / expected.norm()).item()
        print(f"{n_in:>6} -> {n_out:<6} token-block pair {token_blocks:5.2f} us; one-token (deltatune's config) {chosen:5.2f} us "
              f"({token_blocks / chosen:.2f}x); best here {best:5.2f} us (shrink {best_shrink}, expand {best_expand}); error {error:.1e}")
    print("shrink (BLOCK_IN, warps), us summed over shapes:", sorted((round(v, 2), k) for k, v in shrink_sums.items())[:4])
    print("expand (BLOCK_OUT, warps), us summed over shapes:", sorted((round(v, 2), k) for k, v in expand_sums.items())[:4])
    shared_shrink(kernels, rows, rank, adapters)
    return 0


def shared_shrink(kernels, rows: int, rank: int, adapters: int) -> None:
    """q/k/v of the 1B and 7B shapes (they read the same x): three kernel pairs against one shrink
    launch for the three layers and three expands, as a captured decode step runs them."""
    for n_in, outs in [(2048, (2048, 512, 512)), (4096, (4096, 4096, 4096)), (2048, (8192, 8192))]:
        x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)
        downs = [(torch.randn(adapters + 1, rank, n_in, device="cuda") / n_in ** 0.5).bfloat16() for _ in outs]
        ups = [torch.randn(adapters + 1, rank, n_out, device="cuda", dtype=torch.bfloat16) for n_out in outs]
        ys = [torch.randn(rows, n_out, device="cuda", dtype=torch.bfloat16) for n_out in outs]
        row_slot = torch.arange(rows, device="cuda") % adapters

        def separate() -> None:
            for y, down, up in zip(ys, downs, ups):
                kernels.row_lora_add_(y, x, down, up, row_slot, adapters)

        def shared() -> None:
            partials = kernels.row_lora_shrink_one(x, downs, row_slot, adapters)
            for index, (y, up) in enumerate(zip(ys, ups)):
                kernels.row_lora_expand_one_(y, partials, index * rank, up, row_slot, adapters)

        fresh = [torch.randn_like(y) for y in ys]
        expected = [f.clone() for f in fresh]
        for y, down, up in zip(expected, downs, ups):
            kernels.row_lora_add_(y, x, down, up, row_slot, adapters)
        partials = kernels.row_lora_shrink_one(x, downs, row_slot, adapters)
        for index, (y, up) in enumerate(zip(fresh, ups)):
            kernels.row_lora_expand_one_(y, partials, index * rank, up, row_slot, adapters)
        same = all(torch.equal(a, b) for a, b in zip(fresh, expected))
        apart, together = graph_time(separate), graph_time(shared)
        print(f"{n_in:>6} -> {'/'.join(map(str, outs)):<15} separate pairs {apart:5.2f} us; shared shrink {together:5.2f} us "
              f"({apart / together:.2f}x); results identical: {same}")


if __name__ == "__main__":
    sys.exit(main())
