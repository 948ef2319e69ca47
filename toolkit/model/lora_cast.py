"""LoRA's fp32 matrices cast to the autocast dtype once per training step, one kernel per transformer block.

peft keeps LoRA's A and B in fp32 on a bf16 base (the optimizer updates fp32 weights), so under autocast
every use casts them to bf16. Eagerly, autocast caches those casts; inside a compiled block it cannot, and
each graph call (forward, the recompute of gradient checkpointing, backward) launches one small cast kernel
per matrix: about 1,050 launches in a 7B step with LoRA on all 7 projections, on a step the host issues no
faster than the GPU runs it. Here each block's A and B matrices are cast together (``torch._foreach_copy_``)
when the training forward starts, the LoRA linears use those copies, and backward casts the block's
gradients back to fp32 the same way. The values are the same bits as autocast's per-use casts (the same
rounding forward, the bf16 gradient cast to fp32 backward); the fp32 parameters, the optimizer, checkpoints
and merges are untouched.

The copies live from one training forward until the next optimizer step (any torch optimizer's step clears
them), or until a forward outside training; a LoRA linear uses its copy only in training mode.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .blocks import transformer_blocks


class _CastLinear(nn.Linear):
    """peft's ``lora_A``/``lora_B`` linear, which uses the step's cast copy of its weight while training."""

    cast_weight = None

    def forward(self, input):
        weight = self.cast_weight if (self.training and self.cast_weight is not None) else self.weight
        return F.linear(input, weight, self.bias)


class _CastGroup(torch.autograd.Function):
    """Cast many tensors in one ``_foreach_copy_``, and their gradients back the same way."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [w.dtype for w in weights]
        copies = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(copies, list(weights))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        back = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in present]
        if back:
            torch._foreach_copy_(back, [grads[i] for i in present])
        result = [None] * len(grads)
        for i, g in zip(present, back):
            result[i] = g
        return (None, *result)


_LIVE = weakref.WeakSet()


class LoraCast:
    """The LoRA linears of ``model``, grouped by transformer block (the rest, e.g. an adapted LM head, in a
    group of their own). :meth:`refresh` makes the step's copies; :meth:`clear` drops them."""

    def __init__(self, model):
        seen, groups = set(), []
        for scope in [*transformer_blocks(model), model]:
            group = [m for m in _lora_linears(scope) if id(m) not in seen]
            seen.update(id(m) for m in group)
            if group:
                groups.append(group)
        for group in groups:
            for module in group:
                module.__class__ = _CastLinear
        self.groups = groups
        _LIVE.add(self)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def refresh(self, dtype: torch.dtype) -> None:
        for group in self.groups:
            todo = [m for m in group if m.weight.requires_grad and m.weight.dtype != dtype]
            for module, copy in zip(todo, _CastGroup.apply(dtype, *(m.weight for m in todo)) if todo else ()):
                module.cast_weight = copy

    def clear(self) -> None:
        for group in self.groups:
            for module in group:
                module.cast_weight = None


def _lora_linears(scope) -> list:
    """The ``nn.Linear`` children peft keeps in ``lora_A``/``lora_B`` ModuleDicts under ``scope``."""
    found = []
    for module in scope.modules():
        for name in ("lora_A", "lora_B"):
            adapters = getattr(module, name, None)
            if isinstance(adapters, nn.ModuleDict):
                found += [m for m in adapters.values() if type(m) in (nn.Linear, _CastLinear)]
    return found


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now, or None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _clear_after_step(optimizer, args, kwargs) -> None:
    for caster in list(_LIVE):
        caster.clear()


register_optimizer_step_post_hook(_clear_after_step)
