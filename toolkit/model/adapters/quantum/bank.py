"""One batched unitary computation per model forward for all circuits of the same shape.

Building U(θ) takes tens of tiny ops; done per adapted layer (64 in a 7B model on q_proj,v_proj) that
is thousands of kernel launches a step and made vqc 3x slower than LoRA on an H100. A forward pre-hook
on the adapted model instead stacks every layer's θ and builds all unitaries at once; each layer takes
its slice. The result is computed outside any layer (so gradient checkpointing recomputes a layer
without rebuilding it) and afresh on every model forward (so the graph is never reused after backward).
A layer called outside a model forward sees the last model forward's unitaries; merging builds its own.
"""
from __future__ import annotations

import weakref

import torch


class UnitaryBank:
    def __init__(self, deltas, build):
        self.deltas, self.build = list(deltas), build
        self.current = None
        self.handles = []
        for index, delta in enumerate(self.deltas):
            delta._bank = (weakref.ref(self), index)

    def refresh(self, *_):
        with torch.autocast(device_type=self.deltas[0].theta.device.type, enabled=False):
            self.current = self.build(torch.stack([d.theta for d in self.deltas]))

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.current = None


def bank_unitary(delta):
    """This layer's unitary from its bank when a model forward has built one, else None."""
    ref = getattr(delta, "_bank", None)
    bank = ref[0]() if ref else None
    return bank.current[ref[1]] if bank is not None and bank.current is not None else None


def attach_banks(model, deltas) -> list:
    """Group ``deltas`` by circuit shape, one bank each, refreshed by a forward pre-hook on ``model``."""
    groups: dict = {}
    for delta in deltas:
        key = getattr(delta, "bank_key", None)
        if key is not None:
            groups.setdefault(key, []).append(delta)
    banks = [UnitaryBank(group, group[0].batched_unitary) for group in groups.values()]
    for bank in banks:
        bank.handles.append(model.register_forward_pre_hook(bank.refresh))
    return banks
