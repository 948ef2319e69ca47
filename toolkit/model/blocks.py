"""The transformer blocks of an HF model (possibly peft-wrapped): what tk compiles and tiles block by block."""
from __future__ import annotations


def transformer_blocks(model) -> list:
    """Modules whose class HF lists in ``_no_split_modules`` (the decoder layers), in model order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
