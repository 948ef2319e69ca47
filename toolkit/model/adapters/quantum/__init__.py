"""Quantum-circuit adapters ``vqc``, ``tq``, ``quanta`` (pure PyTorch), registered beside peft's LoRA.

``adapter=dict(type='vqc', target_modules=['q_proj', 'v_proj'], n_qubits=3, n_layers=4, alpha=16,
dropout=0.05)``; see docs/quantum.md and QUANTUM.md for the formulas.
"""
from ....registry import ADAPTERS
from .inject import (CONFIG_FILE, WEIGHTS_FILE, adapted_layers, check_mergeable, inject, is_adapter_folder,
                     is_adapter_model, load_adapter, merge_and_unload, read_config, save_adapter, unload)
from .layer import QuantumLinear


def build_vqc(model, **settings):
    return inject(model, "vqc", **settings)


def build_tq(model, **settings):
    return inject(model, "tq", **settings)


def build_quanta(model, **settings):
    return inject(model, "quanta", **settings)


for _name, _builder in (("vqc", build_vqc), ("tq", build_tq), ("quanta", build_quanta)):
    if _name not in ADAPTERS.module_dict:
        ADAPTERS.register_module(name=_name, module=_builder)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "QuantumLinear", "adapted_layers", "build_quanta", "build_tq",
           "build_vqc", "check_mergeable", "inject", "is_adapter_folder", "is_adapter_model", "load_adapter",
           "merge_and_unload", "read_config", "save_adapter", "unload"]
