"""Per-layer circuit math compiled into a few fused kernels on CUDA, opt-in: ``TK_QUANTUM_COMPILE=1``.

Used by the expectation readout of tq and of vqc (``readout='expval'``): encoder, readout and projection
of one layer. By default both run the eager node of readout.py instead (~50 ops a layer, forward and
backward, no compiler): on an H100 the compiled readout left tq's 7B step host-bound at 1.87x LoRA's
(301 ms, the host issuing it in 301 ms) although its GPU work is close to vqc's (1.09x), which points at
the compiled calls' host cost (inferred, not profiled per call). ``TK_QUANTUM_COMPILE=1`` brings the compiled
readout back to compare (dynamic shapes: any number of tokens); it computes the same thing
(tests/gpu/test_quantum_gpu.py compares outputs and gradients).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def compile_readout(x) -> bool:
    """Whether the compiled readout runs for ``x``: a CUDA tensor and ``TK_QUANTUM_COMPILE=1``."""
    return x.is_cuda and os.environ.get("TK_QUANTUM_COMPILE", "0") == "1"


def compiled_on_cuda(fn):
    """``fn`` compiled when :func:`compile_readout` says so for its first argument, else ``fn`` itself."""
    @functools.wraps(fn)
    def run(first, *args):
        if not compile_readout(first):
            return fn(first, *args)
        if run.compiled is None:
            run.compiled = torch.compile(fn, dynamic=True)
        return run.compiled(first, *args)

    run.compiled = None
    return run


@contextlib.contextmanager
def circuit_matmul_precision():
    """Opt-in TF32 for the circuit GEMMs on CUDA: ``TK_QUANTUM_TF32=1``.

    Off by default: QUANTUM.md keeps the circuit math in fp32, and TF32 keeps 10 mantissa bits, so it changes
    the numbers (relative error ~1e-3 a GEMM). With it, cuBLAS runs quanta's and vqc-expval's fp32 GEMMs on
    tensor cores instead of SIMT kernels. Sets torch's global flag only for the enclosed GEMMs.
    """
    if os.environ.get("TK_QUANTUM_TF32", "0") != "1":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
