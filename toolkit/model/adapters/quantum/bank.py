"""One batched unitary computation per model forward for all circuits of the same shape.

Building U(θ) takes tens of tiny ops; done per adapted layer (64 in a 7B model on q_proj,v_proj) that
is thousands of kernel launches a step and made vqc 3x slower than LoRA on an H100. A forward pre-hook
on the module that runs all adapted layers (the decoder) instead stacks every layer's θ and builds all
unitaries at once; each layer takes its slice. The result is computed outside any layer (so gradient
checkpointing recomputes a layer without rebuilding it) and afresh on every forward of that module (so
the graph is never reused after backward).
A layer called outside a model forward sees the last model forward's unitaries, unless its parameters
changed since (an optimizer step, a load, a move): then it builds its own. Merging always builds its own.

A delta joins a bank through ``bank_key`` (equal keys share one build), ``bank_params()`` (the tensors the
build reads) and ``build_bank(deltas)`` (one entry per delta); circuits with angles θ use :class:`ThetaBank`'s.
quanta banks its gates' oriented matrices the same way (quanta.py).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class ThetaBank:
    """Mixin for circuits with angles ``self.theta``: all θ stacked, one ``batched_unitary`` call."""

    def bank_params(self):
        return (self.theta,)

    def build_bank(self, deltas):
        # one tensor per layer via unbind: its backward stacks the layers' gradients once, where each layer
        # indexing the stacked result would add a full-size zero-padded gradient per layer (64 x 512 MiB for
        # vqc expval at n = 10 on a 7B model)
        return self.batched_unitary(torch.stack([d.theta.float() for d in deltas])).unbind(0)


def _versions(delta):
    """What says a parameter changed since the bank read it: its in-place version counter, and its storage
    (``load_state_dict(assign=True)`` and ``.to()`` give a new tensor). Writes that bypass the counter (fused
    optimizers, ``.data`` copies) are covered by :func:`_forget_after_step`."""
    return tuple((p._version, _storage(p)) for p in delta.bank_params())


def _storage(param):
    """Which tensor ``param`` is: its storage, or under DeepSpeed ZeRO-3 (which gathers a parameter into new
    storage for every module forward and frees it after) its ZeRO id."""
    return ("zero", param.ds_id) if hasattr(param, "ds_id") else param.data_ptr()


def _gathered(params):
    """Under DeepSpeed ZeRO-3 the bank's parameters are partitioned outside their layers' forwards, where the
    bank builds: gather them for the build (read only; their gradients still reach ZeRO's reduction hooks)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    # small ones (ZeRO's persistence threshold) stay gathered once a module has used them: leave those be
    partitioned = [p for p in params if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned \
        else contextlib.nullcontext()


_BANKS = weakref.WeakSet()


def _forget_after_step(optimizer, args, kwargs) -> None:
    """Any torch optimizer's step may have rewritten the parameters without bumping their version counter
    (fused AdamW does not): every bank's entries are dropped, and the next model forward builds new ones."""
    for bank in list(_BANKS):
        bank.current = None


register_optimizer_step_post_hook(_forget_after_step)


class UnitaryBank:
    def __init__(self, deltas):
        self.deltas = list(deltas)
        self.current = self.versions = None
        self.handles = []
        for index, delta in enumerate(self.deltas):
            delta._bank = (weakref.ref(self), index)
        _BANKS.add(self)

    def refresh(self, *_):
        params = [p for delta in self.deltas for p in delta.bank_params()]
        with _gathered(params), torch.autocast(device_type=params[0].device.type, enabled=False):
            self.current = self.deltas[0].build_bank(self.deltas)
        self.versions = [_versions(d) for d in self.deltas]

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.current = None


def bank_unitary(delta):
    """This layer's entry from its bank when a model forward has built one from its current parameters,
    else None."""
    ref = getattr(delta, "_bank", None)
    bank = ref[0]() if ref else None
    if bank is None or bank.current is None or bank.versions[ref[1]] != _versions(delta):
        return None
    return bank.current[ref[1]]


def attach_banks(model, layers: dict) -> list:
    """Group the deltas of ``layers`` ({name: QuantumLinear}) by circuit shape, one bank each, refreshed by a
    forward pre-hook on the module that runs them all."""
    groups: dict = {}
    names = list(layers)
    for delta in (layer.delta for layer in layers.values()):
        key = getattr(delta, "bank_key", None)
        if key is not None:
            groups.setdefault(key, []).append(delta)
    banks = [UnitaryBank(group) for group in groups.values()]
    owner = _hook_owner(model, names)
    for bank in banks:
        bank.handles.append(owner.register_forward_pre_hook(bank.refresh))
    return banks


def _hook_owner(model, names):
    """The innermost module whose forward runs every adapted layer: their common ancestor, lifted out of
    plain containers (a ModuleList's forward is never called). For an HF causal LM that is the decoder
    (``model.model``), which tk's loss calls directly, without the LM head's forward."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    common = common[:-1] if len(names) == 1 else common  # one layer: its parent
    while common and isinstance(model.get_submodule(".".join(common)), (torch.nn.ModuleList, torch.nn.ModuleDict)):
        common.pop()
    return model.get_submodule(".".join(common)) if common else model
