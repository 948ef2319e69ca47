"""Build objects from config dicts: ``dict(type=callable_or_registered_name, **kwargs)``, nested.

mmengine's ``build_from_cfg`` builds one level; configs here nest (a quantization config inside the
model loader's arguments), so arguments that are themselves ``type=`` dicts are built first.
"""
from __future__ import annotations

import pydoc

from .errors import UserError


def _dumped_dtype(value):
    """``'torch.bfloat16'`` -> ``torch.bfloat16``: mmengine writes lazily imported attributes of a config it
    dumps to the work dir as their dotted names; torch dtypes are the ones tk's configs use as values."""
    if isinstance(value, str) and value.startswith("torch."):
        import torch
        found = getattr(torch, value[len("torch."):], None)
        if isinstance(found, torch.dtype):
            return found
    return value


def build(cfg, registry=None):
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(build(item, registry) for item in cfg)
    if not isinstance(cfg, dict) or "type" not in cfg:
        return cfg
    kwargs = {key: _dumped_dtype(build(value, registry)) for key, value in cfg.items() if key != "type"}
    factory = cfg["type"]
    if isinstance(factory, str):
        found = registry.get(factory) if registry is not None else None
        if found is None and "." in factory:  # an import path, as mmengine writes configs it dumps
            found = pydoc.locate(factory)
        if found is None:
            choices = f"; choose one of: {', '.join(sorted(registry.module_dict))}" if registry else ""
            raise UserError(f"unknown type {factory!r} in the config{choices}")
        factory = found
    if not callable(factory):
        raise UserError(f"config 'type' must be callable, got {factory!r}")
    return factory(**kwargs)
