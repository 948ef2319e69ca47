"""Long-context switches on a GPU: each one cuts the memory it is for, and the loss stays the same.

Small llama (hidden 1024, intermediate 4096, 4 layers, vocab 32000) at 64k tokens, LoRA r=16 on all 7
projections (dropout 0, so every path draws the same numbers), bf16 autocast, gradient checkpointing, one
forward + backward per variant in this process (after one warm-up step; its seconds are reported too).
Memory is counted from just before the forward:
- chunked LM head: the peak drops by at least the fp32 logits (tokens x vocab x 4 bytes);
- offloaded checkpoints: what stays allocated between forward and backward drops by at least 90% of the
  bytes the offloader copied out (the block inputs), and the peak drops too;
- tiled MLP: the peak drops by at least two [tokens, intermediate] bf16 tensors.
Losses within 1e-3 relative of the plain path (bf16 matmuls of other shapes round differently), LoRA
gradients within 3% of their norm.

With $TK_GPU_7B (a Llama-2-7B-shape folder, tools/run_gpu_tests.sh --make-7b), QLoRA at $TK_LONG_SEQ tokens
(default 262144) with every switch trains one step (forward, backward, AdamW step) and reports its peak.
"""
import gc
import math
import os
import time
from pathlib import Path

import pytest
import torch

from gpu_helpers import make_llama, needs_cuda, report

pytestmark = needs_cuda
SEQ = 65536
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(folder, quantized: bool, r: int = 16, dropout: float = 0.0, **options):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from toolkit.model.loader import load_causal_lm
    from toolkit.model.sft import SupervisedFinetune
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if quantized else None
    llm = load_causal_lm(folder, dtype="bfloat16", quantization_config=quant, attn_implementation="sdpa")
    torch.manual_seed(0)
    lora = dict(type=LoraConfig, r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS,
                task_type="CAUSAL_LM")
    model = SupervisedFinetune(llm, lora, gradient_checkpointing=True, **options).cuda().train()
    torch.manual_seed(2)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model


def _step(model, seq: int, vocab: int):
    ids = torch.randint(3, vocab, (1, seq), generator=torch.Generator().manual_seed(1)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, ids.clone())["loss"]
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # the allocator frees blocks a side stream used only on its next malloc
    between = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    seconds = time.perf_counter() - start
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "between_gib": between / 2**30, "peak_gib": peak / 2**30, "seconds": seconds}, grads


def _run(folder, quantized, **options):
    model = _build(folder, quantized, **options)
    _step(model, SEQ, SHAPE["vocab_size"])  # warm-up: kernels, pinned host blocks, compilation
    model.zero_grad(set_to_none=True)
    offloader = model.activation_offloader
    if offloader:
        offloader.packed_bytes = 0  # count the measured step only
    stats, grads = _step(model, SEQ, SHAPE["vocab_size"])
    stats["offloaded_gib"] = offloader.packed_bytes / 2**30 if offloader else 0.0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return stats, grads


def _close(ours, plain):
    (a, ga), (b, gb) = ours, plain
    assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]), (a, b)
    worst = max((ga[n] - gb[n]).norm().item() / gb[n].norm().item() for n in gb)
    assert worst < 0.03, worst


@pytest.mark.parametrize("quantized", [False, True], ids=["lora_bf16", "qlora_nf4"])
def test_each_switch_cuts_its_memory_and_keeps_the_loss(tmp_path, quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    folder = make_llama(tmp_path / "llama", torch.bfloat16, **SHAPE)
    gib = 2**30
    plain = _run(folder, quantized, loss_chunk_tokens=None)
    chunked = _run(folder, quantized)  # loss_chunk_tokens defaults to 8192
    offload = _run(folder, quantized, offload_activations=True)
    tiled = _run(folder, quantized, tiled_mlp=8192)
    everything = _run(folder, quantized, offload_activations=True, tiled_mlp=8192)
    rows = {"plain": plain[0], "chunked_loss": chunked[0], "offload": offload[0], "tiled_mlp": tiled[0],
            "all": everything[0]}
    report(f"long_context/{'qlora' if quantized else 'lora'}", seq=SEQ,
           **{k: {m: round(v, 4) for m, v in row.items()} for k, row in rows.items()})
    for variant in (chunked, offload, tiled, everything):
        _close(variant, plain)
    logits = SEQ * SHAPE["vocab_size"] * 4 / gib
    assert chunked[0]["peak_gib"] <= plain[0]["peak_gib"] - logits, rows
    layers_bytes = offload[0]["offloaded_gib"]
    assert layers_bytes >= SHAPE["num_hidden_layers"] * SEQ * SHAPE["hidden_size"] * 2 / gib
    assert offload[0]["between_gib"] <= chunked[0]["between_gib"] - 0.9 * layers_bytes, rows
    assert offload[0]["peak_gib"] < chunked[0]["peak_gib"], rows
    assert tiled[0]["peak_gib"] <= chunked[0]["peak_gib"] - 2 * SEQ * SHAPE["intermediate_size"] * 2 / gib, rows
    assert everything[0]["peak_gib"] < min(offload[0]["peak_gib"], tiled[0]["peak_gib"]), rows


def test_switches_under_compiled_blocks(tmp_path):
    """compile=True (transformers 5.17: the checkpoint wraps the compiled block call): offload and the tiled
    MLP still cut their memory, and the loss stays that of the compiled plain path."""
    folder = make_llama(tmp_path / "llama", torch.bfloat16, **SHAPE)
    plain = _run(folder, False, compile=True)
    offload = _run(folder, False, compile=True, offload_activations=True)
    tiled = _run(folder, False, compile=True, tiled_mlp=8192)
    report("long_context/compiled", seq=SEQ, **{k: {m: round(v, 4) for m, v in row[0].items()}
                                                for k, row in dict(plain=plain, offload=offload, tiled=tiled).items()})
    _close(offload, plain)
    _close(tiled, plain)
    assert offload[0]["between_gib"] <= plain[0]["between_gib"] - 0.9 * offload[0]["offloaded_gib"]
    assert tiled[0]["peak_gib"] < plain[0]["peak_gib"]


def test_saved_attention_with_offload_in_compiled_blocks(tmp_path):
    """recompute_attention=False with offload_activations=True in compiled QLoRA blocks (peft's fp32 residual
    stream): the offload hooks sit around each compiled call and move exactly its input, one [tokens, hidden]
    fp32 tensor a layer, so what stays between forward and backward drops by at least 90% of those bytes,
    while the attention outputs the graph keeps stay on the device; loss and gradients are those of the same
    compiled step without offload."""
    pytest.importorskip("bitsandbytes")
    folder = make_llama(tmp_path / "llama", torch.bfloat16, **SHAPE)
    saved = _run(folder, True, compile=True, recompute_attention=False)
    both = _run(folder, True, compile=True, recompute_attention=False, offload_activations=True)
    report("long_context/compiled_save_attention_offload", seq=SEQ,
           **{k: {m: round(v, 4) for m, v in row[0].items()} for k, row in dict(saved=saved, both=both).items()})
    _close(both, saved)
    inputs = SHAPE["num_hidden_layers"] * SEQ * SHAPE["hidden_size"] * 4 / 2**30
    assert both[0]["offloaded_gib"] == pytest.approx(inputs, rel=1e-6), (both[0], inputs)
    assert both[0]["between_gib"] <= saved[0]["between_gib"] - 0.9 * inputs, (both[0], saved[0])


MODEL_7B = os.environ.get("TK_GPU_7B", "")


@pytest.mark.skipif(not (Path(MODEL_7B) / "config.json").is_file(), reason="set TK_GPU_7B to a 7B llama-shape folder")
def test_7b_qlora_trains_at_long_context():
    """One QLoRA training step of the 7B shape at $TK_LONG_SEQ tokens with every switch (and the bf16
    residual stream; $TK_LONG_COMPILE=1 compiles the blocks too): finite loss, LoRA weights move."""
    from transformers import AutoConfig
    pytest.importorskip("bitsandbytes")
    seq = int(os.environ.get("TK_LONG_SEQ", 262144))
    compile = os.environ.get("TK_LONG_COMPILE") == "1"
    vocab = AutoConfig.from_pretrained(MODEL_7B).vocab_size
    model = _build(MODEL_7B, quantized=True, r=64, dropout=0.1, offload_activations=True, tiled_mlp=True,
                   upcast_unquantized=False, compile=compile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    before = [p.detach().clone() for p in params]
    start = time.perf_counter()
    stats, grads = _step(model, seq, vocab)
    optimizer.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    moved = sum(not torch.equal(b, p) for b, p in zip(before, params))
    report("long_context/7b_qlora", seq=seq, compile=compile, loss=round(stats["loss"], 4),
           peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           step_peak_over_weights_gib=round(stats["peak_gib"], 2),
           host_offloaded_gib=round(model.activation_offloader.packed_bytes / 2**30, 2),
           seconds=round(seconds, 1), tokens_per_s=round(seq / seconds, 1))
    assert math.isfinite(stats["loss"]) and all(torch.isfinite(g).all() for g in grads.values())
    assert moved == len(params)


@pytest.mark.parametrize("quantized,compile", [(False, False), (True, False), (True, True)],
                         ids=["lora_bf16", "qlora_nf4", "qlora_nf4_compiled"])
def test_saved_attention_is_faster_and_trains_the_same(tmp_path, monkeypatch, quantized, compile):
    """recompute_attention=False (tk's selective checkpoint): backward no longer recomputes attention, which
    dominates a step at 64k ($TK_SAC_SEQ, 16k-64k), so the step is faster; what stays between forward and
    backward grows by about one [tokens, hidden] bf16 attention output per layer (proof that the kernel's
    output was saved: sdpa ran as one of the saved kernels); loss and gradients stay those of full
    checkpointing. Eager with LoRA dropout 0.1 (the recompute must draw the forward's masks); compiled with
    dropout 0 (AOTAutograd, not checkpoint, handles a compiled block's random draws). Gradients within 1% of
    their norm (the same kernels run; flash attention's backward may accumulate in another order)."""
    if quantized:
        pytest.importorskip("bitsandbytes")
    folder = make_llama(tmp_path / "llama", torch.bfloat16, **SHAPE)
    seq = int(os.environ.get("TK_SAC_SEQ", SEQ))
    monkeypatch.setitem(globals(), "SEQ", seq)  # what _run trains at
    dropout = 0.0 if compile else 0.1
    plain = _run(folder, quantized, dropout=dropout, compile=compile)
    saved = _run(folder, quantized, dropout=dropout, compile=compile, recompute_attention=False)
    name = ("qlora" if quantized else "lora") + ("_compiled" if compile else "")
    report(f"long_context/save_attention/{name}", seq=seq, dropout=dropout,
           speedup=round(plain[0]["seconds"] / saved[0]["seconds"], 3),
           **{k: {m: round(v, 4) for m, v in row[0].items()} for k, row in dict(plain=plain, saved=saved).items()})
    assert abs(saved[0]["loss"] - plain[0]["loss"]) <= 1e-3 * abs(plain[0]["loss"]), (saved[0], plain[0])
    worst = max((saved[1][n] - plain[1][n]).norm().item() / plain[1][n].norm().item() for n in plain[1])
    assert worst < 0.01, worst
    outputs = SHAPE["num_hidden_layers"] * seq * SHAPE["hidden_size"] * 2 / 2**30
    extra = saved[0]["between_gib"] - plain[0]["between_gib"]
    assert 0.9 * outputs <= extra <= 4 * outputs, (extra, outputs)
    assert saved[0]["seconds"] < plain[0]["seconds"], (saved[0], plain[0])
