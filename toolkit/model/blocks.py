"""The transformer blocks of an HF model (possibly peft-wrapped): what tk compiles and tiles block by block."""
from __future__ import annotations

import functools
import logging


def transformer_blocks(model) -> list:
    """Modules whose class HF lists in ``_no_split_modules`` (the decoder layers), in model order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def checkpoint_every_kth_block(model, every: int) -> tuple[int, int]:
    """Leave gradient checkpointing on for blocks 0, k, 2k, ... only (torchtitan's selective layer
    checkpointing): the others keep their activations, so backward recomputes 1/k of the forward instead of
    all of it, for the memory those activations take. Blocks are counted within each stack (the module list
    holding them), so a vision tower's layers do not shift the language model's. Call after transformers
    enabled checkpointing. Returns (blocks still checkpointed, blocks that checkpoint at all)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    stacks = [[m for m in parent.children()
               if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
              for parent in model.modules()]
    layers = [layer for stack in stacks for layer in stack]
    for stack in stacks:
        for index, layer in enumerate(stack):
            layer.gradient_checkpointing = index % every == 0
    return sum(layer.gradient_checkpointing for layer in layers), len(layers)


def keep_deepspeed_hooks_out_of_compile(model) -> int:
    """Make dynamo call DeepSpeed's module hooks instead of tracing them; returns how many were wrapped.

    ZeRO-3 gathers and frees each submodule's weights in forward hooks. Traced into a compiled block, those
    hooks' Python state (module stacks, coordinator objects, grad mode) turns into guards that fail from call
    to call, and dynamo gives up after its recompile limit and runs the block eagerly. Wrapped in
    ``torch.compiler.disable`` they become graph breaks: the block compiles into the pieces between the
    weight fetches (norms, RoPE, activations, residual adds fused), the same graphs for every layer. Where a
    block checkpoints inside its compiled call, the checkpoint moves around it (:func:`_checkpoint_outside`).
    Blocks DeepSpeed fetches whole (:mod:`.zero3_blocks`, tk's default with compiled blocks) have hooks on
    themselves only: each compiles as one graph and keeps its checkpoint inside.

    For a model with DeepSpeed's hooks, DeepSpeed's memory-efficient linear (``zero3_linear_wrap``, which
    ZeRO-3 installs as ``torch.nn.functional.linear``) is wrapped the same way (:func:`_linear_out_of_compile`).
    """
    import torch
    wrapped = found = 0
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "_tk_eager", False):
                    found += 1
                elif (getattr(hook, "__module__", None) or "").startswith("deepspeed"):
                    hooks[key] = torch.compiler.disable(hook)
                    hooks[key]._tk_eager = True
                    wrapped += 1
    deepspeed_linear = _linear_out_of_compile() if wrapped or found else False
    if wrapped:
        from .zero3_blocks import block_inputs_require_grad, whole_compiled_blocks
        leaves = whole_compiled_blocks(model)
        if leaves:  # DeepSpeed fetches them whole, with or without its own linear
            block_inputs_require_grad(model)
        # they compile as one graph each unless DeepSpeed's linear (a user's memory_efficient_linear: true, or one
        # an earlier engine of this process installed) breaks them up at every projection
        whole = [] if deepspeed_linear else leaves
        if whole:
            from mmengine.logging import print_log
            print_log(f"DeepSpeed ZeRO-3: {len(whole)} compiled blocks fetch their weights once a block and run as "
                      f"one graph each (TK_ZERO3_FETCH=module: a fetch per linear)", logger="current")
        _checkpoint_outside(model, keep_inside=whole)
    return wrapped


#: tk's compile-disabled wrapper of DeepSpeed's ``torch.nn.functional.linear``, once made
_eager_linear = None


def _linear_out_of_compile() -> bool:
    """Make ``torch.nn.functional.linear`` a ``torch.compiler.disable`` wrapper of DeepSpeed's replacement,
    if DeepSpeed installed one; returns whether it is that wrapper now.

    On the GPU machine's torch 2.11, dynamo compiled ``zero3_linear_wrap`` as a frame of its own, once per
    input shape and grad mode, until its recompile limit, then ran it eagerly anyway. Each linear already sits
    between two weight fetches, so calling it eagerly costs no fusion. Like DeepSpeed's own replacement, this
    lasts for the process: a later ``torch.compile`` there breaks its graphs at every linear.
    """
    global _eager_linear
    import torch
    linear = torch.nn.functional.linear
    if linear is _eager_linear:
        return True
    if not (getattr(linear, "__module__", None) or "").startswith("deepspeed"):
        return False
    _eager_linear = torch.nn.functional.linear = torch.compiler.disable(linear)
    return True


def _checkpoint_outside(model, keep_inside=()) -> int:
    """Checkpoint each compiled block around its compiled call instead of inside it; returns how many moved.
    Blocks tk checkpoints inside the compiled graph (``sft.checkpoint_in_compiled_graph``) move the same way,
    with the non-reentrant kind. Blocks in ``keep_inside`` (no graph break inside them) stay as they are.

    transformers 5.2x checkpoints inside a layer's ``forward``, so ``block.compile()`` traces the checkpoint as
    one higher-order op, and dynamo cannot break a graph inside one: with DeepSpeed's hooks made graph breaks,
    it would run every checkpointed block eagerly, silently. Around the compiled call (where transformers 5.17
    puts it anyway), the block compiles with its graph breaks and the checkpoint recomputes the compiled call.
    tk's own selective checkpoint (``recompute_attention=False``) must stay inside; those blocks run eagerly,
    and a warning says so.
    """
    from torch.utils.checkpoint import checkpoint as torch_checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer
    from .offload import checkpoint_inside_compiled_block
    from .selective_checkpoint import forward_wrapper, unwrap_forward
    kept = {id(m) for m in keep_inside}
    selective = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None
                 and forward_wrapper(m) == "_forward_saving_attention" and id(m) not in kept]
    if selective:
        from mmengine.logging import print_log
        print_log(f"recompute_attention=False with compiled blocks under ZeRO-3: the selective checkpoint sits "
                  f"inside the compiled call, where DeepSpeed's hooks break the graph, so dynamo runs these "
                  f"{len(selective)} blocks eagerly (same numbers, no fused kernels)", logger="current",
                  level=logging.WARNING)
    moved = 0
    movable = [m for m in model.modules() if id(m) not in kept]
    for module in movable:  # tk's checkpoint inside the compiled graph (sft.checkpoint_in_compiled_graph)
        is_compiled = getattr(module, "_compiled_call_impl", None) is not None
        if is_compiled and forward_wrapper(module) == "_forward_checkpointed":
            unwrap_forward(module)  # the layer's own forward again
            checkpoint_around_compiled_call(module, functools.partial(torch_checkpoint, use_reentrant=False))
            moved += 1
    if not checkpoint_inside_compiled_block():
        return moved
    for module in movable:
        compiled = getattr(module, "_compiled_call_impl", None)
        if (isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
                and compiled is not None):
            checkpoint_around_compiled_call(module, module._gradient_checkpointing_func)
            moved += 1
    return moved


def checkpoint_around_compiled_call(module, checkpoint) -> None:
    """Switch off transformers' checkpoint inside the compiled ``module`` and run its compiled call under
    ``checkpoint`` (a ``torch.utils.checkpoint``-like function) while training instead."""
    module.gradient_checkpointing = False
    module._compiled_call_impl = functools.partial(_checkpointed_call, module, checkpoint, module._compiled_call_impl)


def _checkpointed_call(module, checkpoint, call, *args, **kwargs):
    """``call`` (a block's compiled call) under transformers' checkpoint function while training."""
    import torch
    if not (module.training and torch.is_grad_enabled()):
        return call(*args, **kwargs)
    return checkpoint(functools.partial(call, **kwargs), *args)
