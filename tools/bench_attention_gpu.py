"""The attention floor of a long-context step: causal attention forward and backward per kernel, one GPU.

    python3 tools/bench_attention_gpu.py --seq 65536 [--heads 32 --kv-heads 32 --head-dim 128] [--reps 3]

At 64k tokens attention is most of a QLoRA step on the 7B shape, so how fast the card's attention kernels
run bounds what any step can reach. Times one layer's causal self-attention (bf16, batch 1) through each
kernel torch has here: sdpa restricted to one backend at a time (cuDNN, flash, memory-efficient), sdpa
with torch's own choice, flex_attention compiled with a causal block mask, and the flash varlen kernel
with a single document. Prints one JSON line per kernel: forward ms, forward+backward ms, the TFLOP/s of
each (causal: forward 2·T²·H·D FLOPs, backward 2.5× that), the largest difference of its output to the
cuDNN/flash reference, or why it could not run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed(fn, reps: int) -> float:
    """Milliseconds per call of ``fn`` (median of ``reps``, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _sdpa(backend):
    def attend(q, k, v):
        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with context:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return attend


def _flex(seq: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seq, seq, device="cuda")
    compiled = torch.compile(flex_attention)

    def attend(q, k, v):
        return compiled(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return attend


def _varlen(seq: int):
    from toolkit.model.varlen_attention import _run_kernel

    bounds = torch.tensor([0, seq], dtype=torch.int32, device="cuda")

    def attend(q, k, v):  # tk_varlen's own call of the kernel, one document
        return _run_kernel(q, k, v, bounds, seq, None).transpose(1, 2)
    return attend


KERNELS = {
    "sdpa_cudnn": lambda seq: _sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa_flash": lambda seq: _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": lambda seq: _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_default": lambda seq: _sdpa(None),
    "flex_compiled": _flex,
    "varlen_flash": _varlen,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    args = parser.parse_args()
    kv_heads = args.kv_heads or args.heads
    torch.manual_seed(0)
    shape = (1, args.heads, args.seq, args.head_dim)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn((1, kv_heads, args.seq, args.head_dim), device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    forward_flops = 2 * args.seq ** 2 * args.heads * args.head_dim
    reference = None
    for name in args.kernels:
        row = {"kernel": name, "seq": args.seq, "heads": args.heads, "kv_heads": kv_heads}
        try:
            attend = KERNELS[name](args.seq)
            with torch.no_grad():
                out = attend(q, k, v)
            if reference is None:
                reference = out
            row["max_abs_diff_to_first"] = float((out.float() - reference.float()).abs().max())
            del out
            with torch.no_grad():
                row["forward_ms"] = round(_timed(lambda: attend(q, k, v), args.reps), 2)

            def step():
                attend(q, k, v).backward(grad)
            row["forward_backward_ms"] = round(_timed(step, args.reps), 2)
            row["forward_tflops"] = round(forward_flops / row["forward_ms"] / 1e9, 1)
            backward_ms = row["forward_backward_ms"] - row["forward_ms"]
            row["backward_tflops"] = round(2.5 * forward_flops / backward_ms / 1e9, 1)
        except Exception as error:  # noqa: BLE001 - a kernel this torch or card lacks is a row, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        q.grad = k.grad = v.grad = None
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
