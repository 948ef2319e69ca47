"""Adapters: peft configs (LoRA, DoRA, ...) and tk's own registered adapter types."""
from . import quantum  # noqa: F401  registers vqc, tq, quanta in toolkit.registry.ADAPTERS
from .apply import apply_adapter, is_peft_config

__all__ = ["apply_adapter", "is_peft_config"]
