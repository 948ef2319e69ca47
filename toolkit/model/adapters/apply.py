"""Put an adapter on a model from its config entry.

``adapter=dict(type=LoraConfig, r=64, ...)`` (any peft config class) goes through ``peft.get_peft_model``;
``adapter=dict(type='vqc', ...)`` names an adapter registered in ``toolkit.registry.ADAPTERS``.
"""
from __future__ import annotations

from ...builder import build
from ...errors import UserError
from ...registry import ADAPTERS


def is_peft_config(obj) -> bool:
    from peft import PeftConfig
    return isinstance(obj, PeftConfig)


def is_registered_adapter(adapter_cfg) -> bool:
    """True for one of tk's own adapters (``dict(type='vqc', ...)``), False for peft configs and None."""
    factory = adapter_cfg.get("type") if isinstance(adapter_cfg, dict) else None
    return isinstance(factory, str) and "." not in factory


def apply_adapter(model, adapter_cfg):
    """Return the adapted model; base weights frozen, adapter weights trainable."""
    if adapter_cfg is None:
        return model
    factory = adapter_cfg.get("type") if isinstance(adapter_cfg, dict) else None
    # A dotted name ('peft.tuners.lora.config.LoraConfig', as mmengine writes configs it dumps) is built
    # below like the class itself; a plain name is one of tk's registered adapters.
    if is_registered_adapter(adapter_cfg):
        builder = ADAPTERS.get(factory)
        if builder is None:
            raise UserError(f"unknown adapter type {factory!r}; choose one of: "
                            f"{', '.join(sorted(['LoraConfig (peft)', *ADAPTERS.module_dict]))}")
        kwargs = {k: v for k, v in adapter_cfg.items() if k != "type"}
        return builder(model, **kwargs)
    config = build(adapter_cfg)
    if not is_peft_config(config):
        raise UserError(f"adapter type must be a peft config class or a registered adapter name, "
                        f"got {type(config).__name__}")
    if getattr(config, "task_type", None) is None:
        config.task_type = "CAUSAL_LM"
    from peft import get_peft_model
    return get_peft_model(model, config)
