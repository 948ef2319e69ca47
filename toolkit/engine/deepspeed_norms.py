"""DeepSpeed ZeRO's gradient norm taken in the gradients' own fp32, as torch's ``clip_grad_norm_`` takes it.

DeepSpeed 0.19 casts every fp32 gradient partition to fp64 before its norm (``zero.utils.get_norm_dtype``), so
each step writes and reads a temporary twice the size of the gradients: 23 of the 501 ms of a one-GPU ZeRO-3
step of a 3.5B model on an H200 (docs/benchmarks.md, eighth round), where a norm in fp32 reads the gradients
once. The clip factor it yields is also an fp64 0-dim tensor, so DeepSpeed's in-place multiply of the fp32
gradients by it ran as a casting kernel. Each per-tensor norm in fp32 is what torch and mmengine clip with;
the global norm then differs from DeepSpeed's in about the 7th digit (tests/engine/test_deepspeed_norms.py).

``TK_ZERO_NORM=fp64`` keeps DeepSpeed's own, to compare the two on one machine.
"""
from __future__ import annotations

import torch

from ..switches import new_or_old

#: DeepSpeed's modules that import ``get_norm_dtype`` by name (so the name is replaced in each of them)
ZERO_MODULES = ("deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.stage_1_and_2")


def _fp32() -> torch.dtype:
    return torch.float32


def wants_fp32() -> bool:
    """Whether ``TK_ZERO_NORM`` asks for fp32 norms (the default); a bad value is one line."""
    return new_or_old("TK_ZERO_NORM", "fp32", "fp64")


def norms_in_fp32() -> bool:
    """Make ZeRO stages 1-3 take gradient norms in fp32 (unless ``TK_ZERO_NORM=fp64``); returns whether it did.
    Speed only, so a DeepSpeed that no longer has ``get_norm_dtype`` trains as it is.
    ``tk train --deepspeed`` calls it before DeepSpeed builds its optimizer."""
    import importlib
    if not wants_fp32():
        return False
    patched = False
    for name in ZERO_MODULES:  # a DeepSpeed without the name (older ones took norms in fp32) is left as it is
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "get_norm_dtype"):
            module.get_norm_dtype = _fp32
            patched = True
    return patched
