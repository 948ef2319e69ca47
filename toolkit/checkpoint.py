"""Safe loading of training checkpoints: ``torch.load(weights_only=True)`` with mmengine's types allowed.

mmengine checkpoints hold, besides tensors, its log buffers (``HistoryBuffer``) and numpy scalars.
A ``HistoryBuffer`` pickles its dict of bound statistics methods, which needs ``builtins.getattr`` to
unpickle: allowing that would defeat ``weights_only``. So tk gives ``HistoryBuffer`` a reduce made of
plain lists, and allow-lists only that constructor and numpy's scalar/array types. mmengine's own
resume (which calls ``torch.load`` with torch's safe default) then works too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_ALLOWED = False


def _history_buffer_reduce(buffer):
    return type(buffer), (buffer._log_history.tolist(), buffer._count_history.tolist(), buffer.max_length)


def allow_mmengine_checkpoints() -> None:
    """Call before saving or loading checkpoints (the runner glue and the loaders do)."""
    global _ALLOWED
    if _ALLOWED:
        return
    from mmengine.logging import HistoryBuffer
    HistoryBuffer.__reduce__ = _history_buffer_reduce
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    torch.serialization.add_safe_globals(allowed)
    _ALLOWED = True


def load_checkpoint(path) -> dict:
    """The whole checkpoint dict of an mmengine ``.pth`` file, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give an iter_N.pth file from the run's work dir")
    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {reason}); give an iter_N.pth "
                        f"that tk train wrote") from None


def load_model_state(path) -> dict:
    checkpoint = load_checkpoint(path)
    return checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
