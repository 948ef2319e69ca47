"""Llama-2-7B shape (random weights) on one GPU at seq 2048, batch 1, gradient checkpointing:
QLoRA within 8 GiB peak allocated, LoRA bf16, and full fine-tuning (bf16 weights without autocast or a
loss scaler, paged 8-bit AdamW: 7B of weights, gradients and optimizer state fit one 80 GB GPU).

The model folder comes from $TK_GPU_7B (tools/run_gpu_tests.sh makes it with
tools/baselines/make_random_model.py); without it these tests are skipped.
"""
import math
import os
from pathlib import Path

import pytest

from gpu_helpers import losses, needs_cuda, report, throughput, tk_config, train

MODEL = os.environ.get("TK_GPU_7B", "")
pytestmark = [needs_cuda, pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(),
                                             reason="set TK_GPU_7B to a 7B llama-shape folder")]


@pytest.mark.parametrize("method,steps,optimizer,precision", [("qlora", 8, None, "bf16"), ("lora", 6, None, "bf16"),
                                                              ("full", 4, "paged_adamw_8bit", "bf16")])
def test_7b_trains(method, steps, optimizer, precision, tmp_path):
    text = tk_config(MODEL, method, seq=2048, bs=1, steps=steps, warmup=2, vocab=32000, optimizer=optimizer,
                     precision=precision, dtype="bfloat16", log_interval=1)
    train(tmp_path, text)
    stats = throughput(tmp_path)
    curve = losses(tmp_path)
    report(f"7b/{method}", peak_allocated_gib=stats["peak_allocated_gib"],
           tokens_per_s=stats["tokens_per_s_per_gpu"], mfu=stats.get("mfu"), losses=[round(x, 3) for x in curve])
    assert len(curve) == steps and all(math.isfinite(x) for x in curve)
    if method == "qlora":
        assert stats["peak_allocated_gib"] <= 8.0, stats
