"""Put circuit adapters on the target linear layers of a model; save / load / merge them.

An adapter folder holds ``tk_adapter_model.safetensors`` (every adapter tensor, quanta's frozen S
included) and ``tk_adapter_config.json`` (type and every setting needed to rebuild the circuits;
a distinct name, so peft never mistakes the folder for its own).
"""
from __future__ import annotations

import inspect
import json
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from ....errors import UserError
from .bank import attach_banks
from .layer import QuantumLinear
from .quanta import QuantaDelta
from .tq import TQDelta
from .vqc import VQCDelta

CONFIG_FILE = "tk_adapter_config.json"
WEIGHTS_FILE = "tk_adapter_model.safetensors"
ATTR = "tk_adapter_config"          # set on the adapted model: the settings it was built with


def _vqc(name, layer, n_qubits=3, n_layers=4, alpha=None, readout="amplitude"):
    if readout not in ("amplitude", "expval"):
        raise UserError(f"vqc readout must be 'amplitude' or 'expval', got {readout!r}")
    return VQCDelta(layer.in_features, layer.out_features, n_qubits, n_layers, alpha, readout)


def _tq(name, layer, n_qubits=8, n_layers=2, alpha=None):
    return TQDelta(layer.in_features, layer.out_features, n_qubits, n_layers, alpha)


def _quanta(name, layer, dims=None, seed=0):
    # S must be rebuilt identically when a checkpoint (which holds only trainable T) is converted.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    try:
        return QuantaDelta(layer.in_features, layer.out_features, dims, generator)
    except ValueError as exc:
        raise UserError(f"quanta on {name}: {exc}; pass 2 or more dims whose product covers the layer") from None


DELTAS = {"vqc": _vqc, "tq": _tq, "quanta": _quanta}
MIN_QUBITS = {"vqc": 2, "tq": 2}


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, kind: str, target_modules=("q_proj", "v_proj"), dropout: float = 0.0, **settings):
    """Freeze ``model``, wrap every matching ``nn.Linear`` in a :class:`QuantumLinear`; return ``model``."""
    build = DELTAS[kind]
    n = settings.get("n_qubits")
    if n is not None and not (MIN_QUBITS[kind] <= n <= 16):
        raise UserError(f"{kind}: n_qubits must be between {MIN_QUBITS[kind]} and 16, got {n}")
    allowed = set(inspect.signature(build).parameters) - {"name", "layer"}
    unknown = set(settings) - allowed
    if unknown:
        raise UserError(f"adapter {kind!r} has no setting {sorted(unknown)[0]!r}; "
                        f"it takes: target_modules, dropout, {', '.join(sorted(allowed))}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, QuantumLinear) and _matches(name, target_modules)]
    if not targets:
        raise UserError(f"adapter {kind!r}: target_modules {target_modules!r} match no linear layer of "
                        f"{type(model).__name__}; use names such as 'q_proj', 'v_proj'")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in targets:
        delta = build(name, layer, **settings).to(layer.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantumLinear(layer, delta, dropout).train(layer.training))
    model._tk_banks = attach_banks(model, adapted_layers(model))
    setattr(model, ATTR, {"type": kind, "target_modules": target_modules if isinstance(target_modules, str)
                          else list(target_modules), "dropout": dropout, **settings})
    return model


def is_adapter_model(model: nn.Module) -> bool:
    return getattr(model, ATTR, None) is not None


def adapted_layers(model: nn.Module) -> dict[str, QuantumLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantumLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and frozen buffers), keyed by layer path."""
    return {f"{name}.{key}": t.detach().float().contiguous().cpu()
            for name, layer in adapted_layers(model).items() for key, t in layer.delta.state_dict().items()}


def save_adapter(model: nn.Module, folder) -> None:
    from safetensors.torch import save_file
    config = getattr(model, ATTR, None)
    if config is None:
        raise UserError("this model carries no tk circuit adapter to save")
    folder = Path(folder)
    save_file(adapter_state(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def is_adapter_folder(folder) -> bool:
    return Path(folder, CONFIG_FILE).is_file()


def read_config(folder) -> dict:
    return json.loads(Path(folder, CONFIG_FILE).read_text(encoding="utf-8"))


def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Rebuild the circuits from the folder's config on ``model`` and load their tensors (strictly)."""
    from safetensors.torch import load_file
    settings = read_config(folder)
    model = inject(model, settings.pop("type"), **settings)
    state = load_file(str(Path(folder, WEIGHTS_FILE)))
    layers = adapted_layers(model)
    for name, layer in layers.items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        missing = set(layer.delta.state_dict()) - set(own)
        if missing:
            raise UserError(f"{folder}: {WEIGHTS_FILE} lacks {name}.{sorted(missing)[0]}; "
                            f"is the folder complete and for this base model?")
        layer.delta.load_state_dict(own)
    extra = set(state) - {f"{name}.{key}" for name, layer in layers.items() for key in layer.delta.state_dict()}
    if extra:
        raise UserError(f"{folder}: weight {sorted(extra)[0]} has no matching adapter layer in the base model; "
                        f"is the folder for this base model?")
    return model


def check_mergeable(settings: dict) -> None:
    kind = settings.get("type")
    if kind == "tq" or (kind == "vqc" and settings.get("readout", "amplitude") != "amplitude"):
        what = "tq" if kind == "tq" else "vqc with readout='expval'"
        raise UserError(f"a {what} adapter cannot be merged: its update is not linear in x (⟨Z⟩ is quadratic "
                        f"in the amplitudes); use it unmerged: tk chat BASE --adapter ADAPTER")


def unload(model: nn.Module) -> nn.Module:
    """Put the plain base layers back (merged or not) and drop the adapter's hooks."""
    for name, layer in adapted_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    model.__dict__.pop(ATTR, None)
    for bank in model.__dict__.pop("_tk_banks", []):
        bank.detach()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and put the plain base layers back."""
    check_mergeable(getattr(model, ATTR, {}))
    for layer in adapted_layers(model).values():
        layer.merge()
    return unload(model)
