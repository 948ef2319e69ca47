"""The GEMMs and large copies of one vqc expval unitary build (forward + backward), at any size, on a CPU.

    python3 tools/count_vqc_build.py [--qubits 10 --layers 10 --circuits 64]    # the 7B bench's build

Runs ``vqc_real_unitary`` and its backward on the meta device (shapes and strides only: no memory, no FLOPs)
under a dispatch recorder and prints each distinct GEMM (batch, operands' shapes, strides and conjugation, the
output's strides: what torch hands cuBLAS, which picks its kernel from those) with its call count and the bytes
it reads and writes, and the copies of 1 MiB or more (read + written). The defaults are the bench's vqc expval:
64 circuits (q_proj and v_proj of 32 layers), n = 10, L = 10, i.e. 19 calls of each per-sublayer GEMM.
docs/quantum.md maps these rows to the H100 profile's kernels.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMMS = ("bmm", "mm", "baddbmm", "addmm")
COPIES = ("copy_", "clone", "_to_copy")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _operand(t) -> str:
    return f"{tuple(t.shape)}{tuple(t.stride())}{' conj' if t.is_conj() else ''}"


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.phase, self.rows = "forward", Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        result = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in GEMMS:
            a, b = tensors[-2:]
            out = kwargs.get("out", result)
            what = f"{_operand(a)} @ {_operand(b)} -> strides {tuple(out.stride())}"
            self.rows[(self.phase, "gemm", str(a.dtype).removeprefix("torch."), what,
                       _nbytes(a) + _nbytes(b) + _nbytes(out))] += 1
        elif name in COPIES and tensors and _nbytes(tensors[0]) >= 2 ** 20:
            self.rows[(self.phase, "copy", str(tensors[0].dtype).removeprefix("torch."), _operand(tensors[0]),
                       2 * _nbytes(tensors[0]))] += 1
        return result


def count(qubits: int, layers: int, circuits: int) -> list[tuple]:
    """[(calls, phase, 'gemm' or 'copy', dtype, what, bytes a call)] of one build, forward then backward."""
    from toolkit.model.adapters.quantum.vqc import vqc_real_unitary
    theta = torch.empty(circuits, layers, 4, qubits, device="meta").requires_grad_()
    record = _Record()
    with record:
        out = vqc_real_unitary(theta, qubits)
        record.phase = "backward"
        out.backward(torch.empty_like(out))
    return [(calls, *key) for key, calls in record.rows.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qubits", type=int, default=10)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--circuits", type=int, default=64)
    args = p.parse_args(argv)
    rows = count(args.qubits, args.layers, args.circuits)
    totals = Counter()
    for calls, phase, kind, dtype, what, nbytes in rows:
        print(f"{calls:4d} x {phase:8s} {kind} {dtype:9s} {what}   {nbytes / 2 ** 20:,.1f} MiB a call")
        totals[kind, "calls"] += calls
        totals[kind, "bytes"] += calls * nbytes
    print(f"GEMMs: {totals['gemm', 'calls']} calls, {totals['gemm', 'bytes'] / 2 ** 20:,.0f} MiB read and written; "
          f"copies of 1 MiB+: {totals['copy', 'calls']}, {totals['copy', 'bytes'] / 2 ** 20:,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
