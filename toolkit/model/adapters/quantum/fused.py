"""Per-layer circuit math compiled into a few fused kernels on CUDA; plain eager PyTorch elsewhere.

Used by the expectation readout of tq and of vqc (``readout='expval'``): encoder, readout and projection
of one layer.

A circuit update is tens of small ops per adapted layer (casts, encodings, squares, sums, skinny matmuls);
on a GPU that is tens of thousands of kernel launches a step and the CPU, not the GPU, sets the pace.
``torch.compile`` fuses them (dynamic shapes: any number of tokens). CPU runs stay eager (no compiler
start-up in tests or on laptops); ``TK_QUANTUM_COMPILE=0`` turns compilation off everywhere. The compiled
and the eager function compute the same thing (tests/gpu/test_quantum_gpu.py compares their outputs and
gradients).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def compiled_on_cuda(fn):
    """``fn`` compiled when its first argument is a CUDA tensor (and compiling is on), else ``fn`` itself."""
    @functools.wraps(fn)
    def run(first, *args):
        if not first.is_cuda or os.environ.get("TK_QUANTUM_COMPILE", "1") == "0":
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
