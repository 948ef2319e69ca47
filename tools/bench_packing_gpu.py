"""GPU throughput of packed rows against padded batches and full single-document rows, on real lengths.

    python3 tools/bench_padding.py --write-lengths tools/champ_lengths.json     # once, where the data is
    python3 tools/bench_packing_gpu.py --model /tmp/llama7b --lengths tools/champ_lengths.json [--attn sdpa]
                                       [--pad-to-multiple N]

Takes the token lengths of a real training set (CHAMP with SmolLM2's template, written by bench_padding.py)
and trains one epoch of them three ways through tk's own model wrapper (``SupervisedFinetune``, LoRA r=64 on
every linear layer, gradient checkpointing, bf16, fused AdamW), with random token ids of those lengths:

- padded: ``LengthGroupedSampler`` batches of ``--batch-size`` padded to their longest (the shipped configs);
- packed: best-fit rows of ``--max-length`` (what ``pack_to_max_length=True`` builds), one row a step with
  position ids restarting per document (``packed_collate_fn``), so attention stays within each document;
- split: the documents end to end, cut into rows of exactly ``--max-length`` (``pack_to_max_length='split'``,
  XTuner's packing), one row a step;
- full: as many rows of ``--max-length`` tokens, each a single document (no padding, no document bounds):
  the ceiling packed rows are measured against.

One model and optimizer serve every way, in the order of ``--ways`` (the first way also grows the CUDA
allocator's cache; run ``--ways`` one at a time, or reversed, to check the order does not matter). Each way
is timed over ``--epochs`` passes, tokens/s from the last. One row a step: a config with
``pack_to_max_length=True`` and ``batch_size=4`` joins four packed rows into one of about 8k tokens.

Prints one JSON line per way: steps, real tokens, positions computed, seconds per pass, real tokens per
second, distinct batch lengths.
Padded batches and packed rows change length from step to step; ``--pad-to-multiple N`` rounds them up, to
tell a per-shape cost (cuDNN attention plans, GEMM heuristics) from the attention mask's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_padding import batches  # noqa: E402
from toolkit.data.collate import packed_collate_fn, sft_collate_fn  # noqa: E402
from toolkit.data.encode import Encoded  # noqa: E402
from toolkit.data.pack import best_fit_bins, pack_split  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _item(length: int, vocab: int, generator) -> dict:
    ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
    return {"input_ids": ids, "labels": ids, "pad_token_id": 0}


def epoch_batches(lengths: list, way: str, batch_size: int, max_length: int, vocab: int) -> list:
    """The batches of one epoch over documents of ``lengths`` (random ids), as the dataloader forms them."""
    generator = torch.Generator().manual_seed(0)
    if way == "padded":
        return [sft_collate_fn([_item(lengths[i], vocab, generator) for i in step])
                for step in batches(lengths, batch_size, "length_grouped")]
    if way == "split":
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        dummy = np.zeros(int(offsets[-1]), dtype=np.int32)
        _, pieces = pack_split(Encoded(dummy, dummy.copy(), offsets, np.asarray(lengths)), max_length, seed=0)
        out = []
        for row in pieces:
            item = _item(sum(row), vocab, generator)
            item["position_ids"] = [p for n in row for p in range(n)]
            out.append(packed_collate_fn([item]))
        return out
    rows = best_fit_bins(lengths, max_length, seed=0)
    if way == "packed":
        out = []
        for row in rows:
            items = [_item(lengths[i], vocab, generator) for i in row]
            for item in items:
                item["position_ids"] = list(range(len(item["input_ids"])))
            out.append(packed_collate_fn(items))
        return out
    return [sft_collate_fn([_item(max_length, vocab, generator)]) for _ in rows]


def pad_to_multiple(batch: dict, multiple: int) -> dict:
    """``batch`` with its rows lengthened to a multiple of ``multiple`` positions: pad ids, ignored labels, no
    attention (padded batches) or a trailing document of its own (packed rows: position ids from 0). Fewer
    distinct shapes a epoch, for kernels that plan or tune per shape, at the cost of the added positions."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return batch
    fills = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    out = {}
    for key, value in batch.items():
        if key == "position_ids":
            tail = torch.arange(extra, dtype=value.dtype).expand(value.shape[0], extra)
        else:
            tail = torch.full((value.shape[0], extra), fills[key], dtype=value.dtype)
        out[key] = torch.cat([value, tail], dim=1)
    return out


def build(model_dir: str, attn: str = "sdpa", compile: bool = False):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from toolkit.model.sft import SupervisedFinetune
    llm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn)
    adapter = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS, bias="none",
                         task_type="CAUSAL_LM")
    model = SupervisedFinetune(llm, adapter=adapter, gradient_checkpointing=True, compile=compile).cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    return model, optimizer


def step(model, optimizer, batch: dict) -> float:
    batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def real_tokens(batch: dict) -> int:
    """Positions that hold a document's token: the attention mask's ones (padded batches), else the whole row
    less a padding tail (``pad_to_multiple`` labels it -100; every real token of these items is labelled)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["labels"] != -100).sum())


def measure(model, optimizer, way: str, epoch: list, warmup: int, epochs: int) -> dict:
    """Time ``epochs`` passes over ``epoch`` after ``warmup`` steps; tokens/s from the last pass, in which every
    batch shape has been seen before (the first pass meets most of them for the first time)."""
    for batch in epoch[:warmup]:
        step(model, optimizer, batch)
    seconds = []
    for _ in range(epochs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in epoch:
            step(model, optimizer, batch)
        torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - start, 3))
    real = sum(real_tokens(b) for b in epoch)
    positions = sum(b["input_ids"].numel() for b in epoch)
    return {"way": way, "steps": len(epoch), "real_tokens": real, "positions": positions,
            "seconds_per_epoch": seconds, "real_tokens_per_s": round(real / seconds[-1], 1),
            "distinct_lengths": len({b["input_ids"].shape[1] for b in epoch})}


def profile_step(model, optimizer, batch: dict, path: str) -> str:
    """One more step of ``batch`` under torch.profiler: its chrome trace at ``path`` and where the GPU waited
    on the host (tools/trace_gaps.py)."""
    from torch.profiler import ProfilerActivity, profile

    from trace_gaps import report
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, optimizer, batch)
        torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    return report(path, rows=12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF folder of a llama-shaped model")
    parser.add_argument("--lengths", required=True, help="JSON list of token lengths (bench_padding.py)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="timed passes; tokens/s from the last")
    parser.add_argument("--ways", default="padded,packed,split,full")
    parser.add_argument("--pad-to-multiple", type=int, default=0, metavar="N",
                        help="lengthen every batch to a multiple of N positions (fewer distinct shapes)")
    parser.add_argument("--compile", action="store_true", help="compiled blocks (compile=True), as the GPU configs")
    parser.add_argument("--trace-dir", help="also profile one step of each way (its longest batch) and print where "
                        "the GPU waited on the host; traces written here")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation, e.g. flex_attention (block-sparse "
                        "document masks for packed rows instead of sdpa's dense [T, T] mask)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (this measures GPU throughput; bench_padding.py counts padding on a CPU)")
    lengths = json.loads(Path(args.lengths).read_text())
    model, optimizer = build(args.model, args.attn, args.compile)
    vocab = model.llm.get_input_embeddings().num_embeddings
    for way in args.ways.split(","):
        epoch = epoch_batches(lengths, way, args.batch_size, args.max_length, vocab)
        if args.pad_to_multiple and way != "full":  # full rows stay the unmasked ceiling
            epoch = [pad_to_multiple(batch, args.pad_to_multiple) for batch in epoch]
        print(json.dumps({**measure(model, optimizer, way, epoch, args.warmup, args.epochs), "attn": args.attn,
                          "pad_to_multiple": args.pad_to_multiple}), flush=True)
        if args.trace_dir:
            Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
            longest = max(epoch, key=lambda b: b["input_ids"].numel())
            print(f"{way}: " + profile_step(model, optimizer, longest, str(Path(args.trace_dir) / f"{way}.json")),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
