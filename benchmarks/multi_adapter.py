"""Serving many LoRA adapters in one batch: deltatune's mixed batch vs a merged adapter vs HF peft.

    PYTHONPATH=src python3 benchmarks/multi_adapter.py                    # CPU, a small Llama-shaped model
    PYTHONPATH=src python3 benchmarks/multi_adapter.py --device cuda      # 1B Llama shape, bf16
    PYTHONPATH=src python3 benchmarks/multi_adapter.py --device cuda --adapters 1,8,32,64 --batch 64

Each row of the batch has its own LoRA adapter (r=16, alpha=32, on all seven projections); the
rows are spread round-robin over 1, 8 or 32 distinct adapters. Modes, on the same random-init base
weights and the same adapters (B random too, so every adapter changes the output):

  merged     one adapter folded into the base and the wrappers removed (merge_and_unload): the plain
             model, the ceiling for any per-row method, though it serves one adapter only;
  deltatune  DeltaModel(..., adapter_names=rows): stacked adapters; in an eager forward each bias-free
             linear base's matmul accumulates onto the rows' products (addmm_ over bmm results);
  peft       PeftModel(..., adapter_names=rows), the adapters loaded from the files deltatune saved
             (only for batches over at most --peft-max-adapters adapters, --peft-repeats times: its
             generate() slows with the number of adapters, ~40 s a call at 32);
  +continuous the rows admitted together to a deltatune.continuous.ContinuousDecoder (the server's
             --batching continuous) and stepped to the end; its steps too are replayed as a CUDA
             graph on CUDA, captured once for all calls (merged+continuous: the merged model in
             the same decoder, the like-for-like ceiling of deltatune+continuous);
  +graph     merged and deltatune decoded by deltatune.generation.greedy_generate: a static key/value
             cache and, on CUDA, the one-token step captured once as a CUDA graph and replayed
             (deltatune's step then adds the rows' products with Triton kernels, SGMV-style: one
             shrink launch shared by the layers that read the same input, q/k/v and gate/up, and
             an expand per layer).

prefill: one forward over batch x prefill-len tokens (a +graph mode's prefill is its eager mode's).
generate: greedy decoding of --new-tokens tokens after a short --prompt-len prompt, the prompt's
prefill and any graph capture included: new tokens per second. Times are medians over --repeats
after --warmup (compile, autotune and allocator growth happen there), the modes taking turns (CUDA:
synchronised); "spread" is (slowest - fastest) / median over the repeats, and the last line names
every row above 5%. Checks: the relative difference (norm) of deltatune's prefill logits from
peft's (and for one adapter from the merged model's), and how many graph-decoded tokens equal
generate()'s.

Adapters are cast to the model's dtype in every mode (bf16 on CUDA), as a server would keep them,
and all modes run Hugging Face's own Llama blocks (deltatune's fused training kernels are undone).
On a shared CPU, --threads 1 keeps the numbers steady.

Measured 2026-12-01 on the lent H200 (torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, bf16;
1B shape, batch 32, prefill 32 x 256, generate 64 tokens after 16), --device cuda --repeats 6:

    adapters              mode  prefill tok/s  generate tok/s  spread p/g
           1            merged        198,161           2,285      1%/54%
           1      merged+graph     (as above)           7,646       -/13%
           1         deltatune        162,467           1,018      1%/55%
           1   deltatune+graph     (as above)           5,536       -/26%
           1              peft         78,112             742      5%/17%
           8            merged        195,966           2,195      1%/40%
           8      merged+graph     (as above)           7,986        -/8%
           8         deltatune        153,152           1,161     13%/37%
           8   deltatune+graph     (as above)           5,602       -/16%
           8              peft         24,715             146      13%/9%
          32            merged        196,533           1,828      3%/59%
          32      merged+graph     (as above)           7,608       -/19%
          32         deltatune        159,989           1,015      2%/32%
          32   deltatune+graph     (as above)           5,184       -/27%

    adapters  prefill  generate  generate  generate  prefill  generate  check
              /merged   /merged  graph/gr  graph/hf    /peft   gr/peft
           1    0.82x     0.45x     0.72x     2.42x    2.08x     7.46x  graph tokens = generate()'s: 37%; logits vs merged 3.8e-02; logits vs peft 0.0e+00
           8    0.78x     0.53x     0.70x     2.55x    6.20x    38.38x  graph tokens = generate()'s: 46%; logits vs peft 1.9e-02
          32    0.81x     0.56x     0.68x     2.84x        -         -  graph tokens = generate()'s: 41%

Every row was flagged: the eager generate() steps are bound by the host (Python and launches), whose
pace varied by up to 1.5x between repeats on that machine; the graph-decoded rows vary less. Read
the ratios of one run. The whole run took 4 min 25 s.

Where it stands: graph-decoded, a batch over 32 adapters generates 2.8x faster than the merged model
through generate() and at 0.68-0.72x the merged model decoded the same way (its LoRA products, two
~3.5 us kernels per projection on a ~3.4 ms step, are the gap); prefill is at 0.78-0.82x, bound by
the host's per-layer work. The token agreement is low because the eager path (cuBLAS, one rounding)
and the captured one (Triton) round bf16 differently, and a random-init model's greedy choices are
near-ties (one adapter's unmerged logits differ from the merged model's by 3.8e-2 in norm); in
float32 on the CPU the two decoders give identical tokens (tests/test_generation.py). On the
2-core CPU (hidden 256, 4 layers, --threads 1) no CUDA graphs are made.

2026-12-02, same machine and command, with the continuous mode: deltatune+continuous generated
1.09x / 1.11x / 1.13x deltatune+graph's tokens/s over 1 / 8 / 32 adapters (one capture each;
32 adapters: 6,037 against merged+graph's 8,004 and deltatune+graph's 5,360). Its tokens equal
the graph-decoded ones at 29% / 75% / 78%: its prefill attends over a cache as wide as the longest
prompt rather than the whole call's, and routes over all 32 adapters (1 adapter: the gathered form
rather than the masked one), so bf16 rounds differently on the same near-ties;
tests/test_continuous.py holds captured steps to eager ones on CUDA and to each request run alone on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "cpu": Shape("small (CPU)", hidden=256, layers=4, intermediate=688, heads=4, kv_heads=2, vocab=2048),
    "1b": Shape("1B", hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=32000),
}


@dataclass
class Timing:
    prefill_tokens_per_s: float
    generate_tokens_per_s: float
    logits: torch.Tensor
    tokens: torch.Tensor  # the generated tokens (batch, new tokens)
    prefill_spread: float  # (slowest - fastest) / median over the repeats
    generate_spread: float
    captures: int = 0  # the continuous mode's CUDA graph captures over all its calls


# ----------------------------------------------------------------------------- model and adapters
def build_base(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def randomize_lora(model: nn.Module, adapter: str, seed: int, b_std: float) -> None:
    """A from kaiming init already; B (zero at init) random, so each adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f"lora_B.{adapter}.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)


def save_adapters(base: nn.Module, count: int, directory: Path, seed: int, b_std: float) -> list[Path]:
    """Make `count` LoRA adapters with deltatune on a copy of base and save each in peft's format."""
    import deltatune as dt

    config = dt.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=TARGET_MODULES)
    model = dt.DeltaModel(copy.deepcopy(base))
    paths = []
    for index in range(count):
        name = f"a{index}"
        model.add_adapter(name, config)
        randomize_lora(model, name, seed + index, b_std)
        paths.append(model.save(directory / name, name))
    return paths


def load_deltatune(base: nn.Module, paths: list[Path], dtype: torch.dtype) -> nn.Module:
    import deltatune as dt

    # fused=False: every mode runs the same Hugging Face block code (the fused block ops are a
    # training speed-up), so only the adapter path differs.
    model = dt.DeltaModel(copy.deepcopy(base), fused=False)
    for path in paths:
        model.load_adapter(path, path.name)
    return model.to(dtype).eval()


def load_peft(base: nn.Module, paths: list[Path], dtype: torch.dtype) -> nn.Module:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=paths[0].name)
    for path in paths[1:]:
        model.load_adapter(path, adapter_name=path.name)
    return model.to(dtype).eval()


def load_merged(base: nn.Module, path: Path, dtype: torch.dtype) -> nn.Module:
    import deltatune as dt

    model = dt.load(copy.deepcopy(base), path, adapter_name=path.name, fused=False).to(dtype)
    return model.merge_and_unload().eval()


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(runs: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                        repeats_of: dict[str, int | None] | None = None) -> dict[str, tuple[float, float]]:
    """(median seconds, spread) of each run, the runs taking turns so that a busy machine slows all
    alike; spread = (slowest - fastest) / median. repeats_of caps the repeats of slow runs."""
    for _ in range(warmup):  # compile, autotune, capture and allocator growth happen here
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(repeats):
        for name, run in runs.items():
            if index >= ((repeats_of or {}).get(name) or repeats):
                continue
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(values), (max(values) - min(values)) / statistics.median(values))
            for name, values in times.items()}


@dataclass
class Mode:
    """One way of serving the batch: a model, the routing arguments its calls take, and how it
    decodes ("hf": the model's generate(); "graph": deltatune.generation.greedy_generate, a static
    cache with the step replayed as a CUDA graph on CUDA)."""

    model: nn.Module
    routing: dict
    decode: str = "hf"
    repeats: int | None = None  # fewer repeats for a slow mode (peft with many adapters)
    decoder: object = None  # the continuous mode's ContinuousDecoder, kept across calls as a server keeps it

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, **self.routing).logits

    def generate(self, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        if self.decode == "graph":
            from deltatune.generation import greedy_generate

            return greedy_generate(self.model, prompt_ids, new_tokens, **self.routing)
        if self.decode == "continuous":
            return self.continuous(prompt_ids, new_tokens)
        return self.model.generate(
            input_ids=prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, use_cache=True, **self.routing,
        )


    def continuous(self, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Every row admitted at once to a ContinuousDecoder and stepped to its end."""
        from deltatune.continuous import ContinuousDecoder, DecodeRequest

        batch, prompt = prompt_ids.shape
        if self.decoder is None:
            self.decoder = ContinuousDecoder(self.model, rows=batch, context=prompt + new_tokens)
        names = self.routing.get("adapter_names") or [None] * batch
        requests = [DecodeRequest(name, ids, new_tokens, tag=i) for i, (name, ids) in enumerate(zip(names, prompt_ids.tolist()))]
        done = dict((request.tag, tokens) for request, tokens in self.decoder.admit(requests))
        while self.decoder.active:
            done.update((request.tag, tokens) for request, tokens in self.decoder.step())
        return torch.cat([prompt_ids, torch.tensor([done[i] for i in range(batch)], device=prompt_ids.device)], dim=1)


def measure(modes: dict[str, Mode], args, device: torch.device) -> dict[str, Timing]:
    """Prefill and generate throughput of every mode, measured side by side."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    vocab = next(iter(modes.values())).model.config.vocab_size
    prefill_ids = torch.randint(0, vocab, (args.batch, args.prefill_len), generator=generator).to(device)
    prompt_ids = prefill_ids[:, : args.prompt_len]
    prefill_modes = {name: mode for name, mode in modes.items() if mode.decode == "hf"}  # graph modes: same prefill
    with torch.inference_mode():
        logits = {name: mode.prefill(prefill_ids).float() for name, mode in prefill_modes.items()}
        prefill = interleaved_medians(
            {name: (lambda m=mode: m.prefill(prefill_ids)) for name, mode in prefill_modes.items()},
            device, args.warmup, args.repeats, {name: mode.repeats for name, mode in prefill_modes.items()},
        )
        generate = interleaved_medians(
            {name: (lambda m=mode: m.generate(prompt_ids, args.new_tokens)) for name, mode in modes.items()},
            device, args.warmup, args.repeats, {name: mode.repeats for name, mode in modes.items()},
        )
        tokens = {name: mode.generate(prompt_ids, args.new_tokens)[:, args.prompt_len:] for name, mode in modes.items()}
    timings = {}
    for name, mode in modes.items():
        prefill_name = name.split("+")[0]
        seconds, spread = prefill[prefill_name]
        generate_seconds, generate_spread = generate[name]
        timings[name] = Timing(
            args.batch * args.prefill_len / seconds, args.batch * args.new_tokens / generate_seconds,
            logits[prefill_name], tokens[name], spread if mode.decode == "hf" else 0.0, generate_spread,
            getattr(mode.decoder, "captures", 0),
        )
    return timings


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- report
def token_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


SPREAD_LIMIT = 0.05


def format_table(title: str, results: dict[int, dict[str, Timing]]) -> str:
    """Throughput per mode, then ours against the merged adapter and against peft."""
    lines = [title, f"{'adapters':>8}{'mode':>22}{'prefill tok/s':>15}{'generate tok/s':>16}{'spread p/g':>12}"]
    flagged = []
    for count, modes in results.items():
        for mode, timing in modes.items():
            graph = "+" in mode
            prefill = "(as above)" if graph else f"{timing.prefill_tokens_per_s:,.0f}"
            spread = f"{'-' if graph else f'{timing.prefill_spread:.0%}'}/{timing.generate_spread:.0%}"
            lines.append(f"{count:>8}{mode:>22}{prefill:>15}{timing.generate_tokens_per_s:>16,.0f}{spread:>12}")
            if max(timing.prefill_spread, timing.generate_spread) > SPREAD_LIMIT:
                flagged.append(f"{count} adapters {mode}")
    lines += ["", f"{'adapters':>8}{'prefill':>9}{'generate':>10}{'generate':>10}{'generate':>10}"
                  f"{'prefill':>9}{'generate':>10}  check",
              f"{'':>8}{'/merged':>9}{'/merged':>10}{'graph/gr':>10}{'graph/hf':>10}{'/peft':>9}{'gr/peft':>10}"]
    for count, modes in results.items():
        ours, graphed, merged, merged_graphed = modes["deltatune"], modes["deltatune+graph"], modes["merged"], modes["merged+graph"]
        peft_ = modes.get("peft")
        check = f"graph tokens = generate()'s: {token_agreement(graphed.tokens, ours.tokens):.0%}"
        continuous = modes.get("deltatune+continuous")
        if continuous is not None:
            check += (f"; continuous {continuous.generate_tokens_per_s / graphed.generate_tokens_per_s:.2f}x graph-decoded"
                      f" ({continuous.captures} captures), tokens equal: {token_agreement(continuous.tokens, graphed.tokens):.0%}")
            merged_continuous = modes.get("merged+continuous")
            if merged_continuous is not None:
                check += f"; continuous vs merged continuous {continuous.generate_tokens_per_s / merged_continuous.generate_tokens_per_s:.2f}x"
        if count == 1:  # every row on the merged adapter: the same model
            check += f"; logits vs merged {relative_difference(ours.logits, merged.logits):.1e}"
        peft_cols = f"{'-':>9}{'-':>10}"
        if peft_ is not None:
            check += f"; logits vs peft {relative_difference(ours.logits, peft_.logits):.1e}"
            peft_cols = (f"{ours.prefill_tokens_per_s / peft_.prefill_tokens_per_s:>8.2f}x"
                         f"{graphed.generate_tokens_per_s / peft_.generate_tokens_per_s:>9.2f}x")
        lines.append(
            f"{count:>8}{ours.prefill_tokens_per_s / merged.prefill_tokens_per_s:>8.2f}x"
            f"{ours.generate_tokens_per_s / merged.generate_tokens_per_s:>9.2f}x"
            f"{graphed.generate_tokens_per_s / merged_graphed.generate_tokens_per_s:>9.2f}x"
            f"{graphed.generate_tokens_per_s / merged.generate_tokens_per_s:>9.2f}x{peft_cols}  {check}"
        )
    lines.append("(generate /merged: both through generate(); graph/gr: both graph-decoded; graph/hf: ours graph-decoded "
                 "over the merged model's generate(); gr/peft: ours graph-decoded over peft's generate())")
    lines.append(f"rows whose spread over the repeats exceeds {SPREAD_LIMIT:.0%}: {', '.join(flagged) or 'none'}")
    return "\n".join(lines)


def environment_line(device: torch.device, dtype: torch.dtype) -> str:
    import peft
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return (f"{datetime.date.today().isoformat()}, {where}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, {str(dtype).removeprefix('torch.')}, LoRA r={LORA_RANK} alpha={LORA_ALPHA} on "
            f"{len(TARGET_MODULES)} projections")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: cpu on CPU, 1b on CUDA")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--adapters", default="1,8,32", help="comma list of distinct adapter counts in the batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefill-len", type=int, default=None, help="tokens per row of the prefill forward (default: 32 CPU, 256 CUDA)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row before decoding")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default: 8 CPU, 64 CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 CPU, 10 CUDA")
    parser.add_argument("--b-std", type=float, default=None, help="std of the random LoRA B (default: 0.05 / sqrt(r * hidden / 256))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peft-max-adapters", type=int, default=8,
                        help="run peft only for batches over at most this many adapters (its generate slows with the count)")
    parser.add_argument("--peft-repeats", type=int, default=3, help="timed repeats of peft (slow)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    shape = SHAPES[args.shape or ("1b" if cuda else "cpu")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.prefill_len = args.prefill_len or (256 if cuda else 32)
    args.new_tokens = args.new_tokens or (64 if cuda else 8)
    args.repeats = args.repeats or (10 if cuda else 3)
    b_std = args.b_std if args.b_std is not None else 0.05 / (LORA_RANK * shape.hidden / 256) ** 0.5
    counts = [int(c) for c in args.adapters.split(",")]
    if args.prompt_len > args.prefill_len:
        parser.error("--prompt-len must not exceed --prefill-len (the prompt is the prefill batch's start)")
    print(environment_line(device, dtype), flush=True)

    base = build_base(shape, device, dtype, args.seed)
    results: dict[int, dict[str, Timing]] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = save_adapters(base, max(counts), Path(folder), args.seed, b_std)
        merged = Mode(load_merged(base, paths[0], dtype), {})
        ours = load_deltatune(base, paths, dtype)
        # Its own copy: it routes over every adapter in one fixed order, and a layer keeps the stacks
        # of one adapter set, so sharing a model with the modes above would restack both at every call.
        ours_continuous = load_deltatune(base, paths, dtype)
        peft_ = load_peft(base, paths[: max(1, min(max(counts), args.peft_max_adapters))], dtype)
    for count in counts:
        rows = [f"a{i % count}" for i in range(args.batch)]
        started = time.time()
        modes = {"merged": merged, "merged+graph": Mode(merged.model, {}, "graph"), "merged+continuous": Mode(merged.model, {}, "continuous"),
                 "deltatune": Mode(ours, {"adapter_names": rows}), "deltatune+graph": Mode(ours, {"adapter_names": rows}, "graph"),
                 "deltatune+continuous": Mode(ours_continuous, {"adapter_names": rows}, "continuous")}
        if count <= args.peft_max_adapters:
            modes["peft"] = Mode(peft_, {"adapter_names": rows}, repeats=args.peft_repeats)
        results[count] = measure(modes, args, device)
        summary = ", ".join(f"{name} {t.prefill_tokens_per_s:,.0f} / {t.generate_tokens_per_s:,.0f}" for name, t in results[count].items())
        print(f"{count} adapters, prefill / generate tok/s: {summary} ({time.time() - started:.0f} s)", flush=True)

    title = (f"{shape.name}: hidden {shape.hidden}, {shape.layers} layers, MLP {shape.intermediate}, batch {args.batch}; "
             f"prefill {args.batch} x {args.prefill_len} tokens; generate {args.new_tokens} tokens after a {args.prompt_len}-token prompt")
    print("\n" + environment_line(device, dtype))
    print(format_table(title, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
