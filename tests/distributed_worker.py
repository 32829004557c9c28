"""Run under torchrun by tests/test_distributed.py (2 processes, gloo): trains LoRA and QLoRA with
DDP and FSDP2, resumes a one-process checkpoint, writes a checkpoint for one process to resume,
and fills a model built on the meta device after sharding it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import deltatune as dt  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from deltatune import distributed  # noqa: E402
from deltatune.train import TrainConfig, train  # noqa: E402

STEPS = 3
BATCH = 8


def examples() -> list[dict[str, torch.Tensor]]:
    """16 rows of 12 tokens; the first (i % 5) labels of row i are -100, so the processes' halves
    of a batch hold different numbers of targets (the mean must still be the whole batch's)."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for i in range(16):
        ids = torch.randint(0, 101, (12,), generator=generator)
        labels = ids.clone()
        labels[: i % 5] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels})
    return rows


def adapter_config(method: str):
    return dt.QLoraConfig(r=4, lora_alpha=8) if method == "qlora" else dt.LoraConfig(r=4, lora_alpha=8)


def run(strategy: str, method: str, output: Path, steps: int = STEPS, **options) -> list[float]:
    model = dt.wrap(tiny_llama(seed=0), adapter_config(method))
    config = TrainConfig(max_steps=steps, batch_size=BATCH, lr=1e-2, warmup_ratio=0.0, mixed_precision="no",
                         progress=False, log_every=0, device="cpu", distributed=strategy, **options)
    result = train(model, examples(), config)
    model.save(output)
    return result.losses


MERGE_IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=MERGE_IDS).logits


def alone_and_sharded(options: dict) -> tuple:
    """The same LoRA adapter (random B: it changes the output) in one process and FSDP2-sharded."""
    config = dt.LoraConfig(r=4, init_lora_weights=False, **options)
    torch.manual_seed(5)
    alone = dt.wrap(tiny_llama(seed=0), config).eval()
    torch.manual_seed(5)
    return alone, distributed.prepare(dt.wrap(tiny_llama(seed=0), config), "fsdp2").eval()


def merge_in_place(options: dict) -> dict[str, float]:
    """merge() and unmerge() on an FSDP2-sharded LoRA model against the same adapter in one process:
    the largest differences of logits and of a merged base weight (0 when they agree)."""
    alone, sharded = alone_and_sharded(options)

    def q_weight(model):
        return distributed.gather_full(model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach())

    unmerged = logits(alone)
    with alone.disable_adapters():
        base = logits(alone)
    before = logits(sharded)
    alone.merge()
    sharded.merge()
    report = {"unmerged": (before - unmerged).abs().max().item(), "merged": (logits(sharded) - logits(alone)).abs().max().item(),
              "merged weight": (q_weight(sharded) - q_weight(alone)).abs().max().item(),
              "adapter changes the output": (unmerged - base).abs().max().item()}
    sharded.unmerge()
    report["unmerged again"] = (logits(sharded) - unmerged).abs().max().item()
    return report


def merged_copy() -> dict:
    """merge_and_unload() on an FSDP2-sharded LoRA model (every rank calls it) against the same
    adapter merged in one process; and the sharded model afterwards."""
    alone, sharded = alone_and_sharded({})
    sharded.merge()  # folded into the shards, an adapter must not be merged into the copy a second time
    try:
        sharded.merge_and_unload()
        refusal = "not refused"
    except distributed.DistributedError as err:
        refusal = str(err)
    sharded.unmerge()
    before = logits(sharded)
    plain = sharded.merge_and_unload()
    report = {"ranks given a model": distributed.all_sum(plain is not None), "after merge()": refusal,
              "sharded model changed by": (logits(sharded) - before).abs().max().item()}
    if distributed.is_main():
        want = alone.merge_and_unload()
        report["class"] = type(plain).__name__
        report["plain modules only"] = not any("deltatune" in type(m).__module__ for m in plain.modules())
        report["same keys"] = list(plain.state_dict()) == list(want.state_dict())
        report["logits differ by"] = (logits(plain) - logits(want)).abs().max().item()
        report["adapter changed the output"] = (logits(want) - logits(tiny_llama(seed=0).eval())).abs().max().item()
    return report


def sharded_codes() -> dict:
    """QLoRA under FSDP2: how much of the 4-bit codes each rank holds, and the logits and parameter
    count against the same model in one process."""
    config = dt.QLoraConfig(r=4, init_lora_weights=False)
    torch.manual_seed(5)
    alone = dt.wrap(tiny_llama(seed=0), config).eval()
    torch.manual_seed(5)
    sharded = distributed.prepare(dt.wrap(tiny_llama(seed=0), config), "fsdp2").eval()
    codes = [m.qweight for m in sharded.modules() if "qweight" in getattr(m, "shardable_buffers", ())]
    local = sum(c.to_local().numel() for c in codes)
    whole = sum(c.numel() for c in codes)
    return {"layers": len(codes), "share held": local / whole, "held by all ranks": distributed.all_sum(local) / whole,
            "logits differ by": (logits(sharded) - logits(alone)).abs().max().item(),
            "same parameter count": sharded.trainable_parameters().total == alone.trainable_parameters().total}


def built_on_meta(method: str) -> dict:
    """A LoRA or QLoRA model built on the meta device, sharded by prepare() and filled there from the
    whole tensors (distributed.fill_from_full; QLoRA's 4-bit codes and block constants among them),
    against the same model built whole in one process: logits, then the losses of three SGD steps
    on one batch (every rank the same batch, so the averaged gradient is that batch's)."""
    config = (dt.QLoraConfig if method == "qlora" else dt.LoraConfig)(r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(5)
    alone = dt.wrap(tiny_llama(seed=0), config)
    with torch.device("meta"):
        meta = dt.wrap(tiny_llama(seed=0), config)
    whole = {name: t.detach().clone() for name, t in [*alone.named_parameters(), *alone.named_buffers()]}
    sharded = distributed.prepare(meta, "fsdp2", init_weights=lambda model: distributed.fill_from_full(model, whole))
    rotary = sharded.model.model.rotary_emb
    report = {"left on meta": sum(t.is_meta for t in [*sharded.parameters(), *sharded.buffers()]),
              "rotary table differs by": (rotary.inv_freq - alone.model.model.rotary_emb.inv_freq).abs().max().item(),
              "logits differ by": (logits(sharded.eval()) - logits(alone.eval())).abs().max().item()}
    with alone.disable_adapters():
        report["adapter changes the output"] = (logits(alone) - logits(sharded)).abs().max().item()
    for name, model in (("alone", alone), ("sharded", sharded)):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for _ in range(3):
            loss = model(input_ids=MERGE_IDS, labels=MERGE_IDS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        report[f"losses {name}"] = losses
    return report


def held_per_rank() -> dict:
    """What rank 0 holds under FSDP2 (LoRA and QLoRA on the tiny Llama): its parameter shards (the
    4-bit codes among them), and after one AdamW step its gradient shards and optimizer state."""
    report = {}
    for method in ("lora", "qlora"):
        model = distributed.prepare(dt.wrap(tiny_llama(seed=0), adapter_config(method)), "fsdp2")
        params = list({id(p): p for p in model.parameters()}.values())
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad])
        model(input_ids=MERGE_IDS, labels=MERGE_IDS).loss.backward()
        optimizer.step()

        def held(tensors) -> int:
            return sum(distributed.local_view(t).numel() * t.element_size() for t in tensors)

        report[method] = {"parameters": held(params), "gradients": held(p.grad for p in params if p.grad is not None),
                          "optimizer states": held(v for state in optimizer.state.values() for v in state.values()
                                                   if isinstance(v, torch.Tensor))}
    return report


def main(out: Path, single_checkpoint: Path) -> None:
    import logging

    distributed.init_from_env()
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("deltatune.train")  # "resumed from ... at step N" goes to a file the test reads
    log.addHandler(logging.FileHandler(out / f"log-rank{distributed.rank()}.txt"))
    log.setLevel(logging.INFO)
    losses = {}
    for strategy in ("ddp", "fsdp2"):
        for method in ("lora", "qlora"):
            losses[f"{strategy}-{method}"] = run(strategy, method, out / f"{strategy}-{method}")
    # A checkpoint one process wrote, resumed here on two; and one written here for one to resume.
    # (A constant rate: a linear decay would depend on the first run's shorter max_steps.)
    losses["resumed-on-2"] = run("fsdp2", "lora", out / "resumed-on-2", steps=4, output_dir=str(single_checkpoint),
                                 resume=True, schedule="constant")
    run("fsdp2", "lora", out / "two-steps", steps=2, output_dir=str(out / "checkpoints-of-2"), checkpoint_every=2,
        schedule="constant")
    merges = {variant: merge_in_place(options) for variant, options in (("lora", {}), ("dora", {"use_dora": True}))}
    unloaded = merged_copy()
    codes = sharded_codes()
    meta = {method: built_on_meta(method) for method in ("lora", "qlora")}
    held = held_per_rank()
    if distributed.is_main():
        (out / "held-per-rank.json").write_text(json.dumps(held))
        (out / "built-on-meta.json").write_text(json.dumps(meta))
        (out / "sharded-codes.json").write_text(json.dumps(codes))
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "merge-in-place.json").write_text(json.dumps(merges))
        (out / "merge-and-unload.json").write_text(json.dumps(unloaded))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
