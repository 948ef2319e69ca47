"""The transformer blocks of an HF model (possibly peft-wrapped): what tk compiles and tiles block by block."""
from __future__ import annotations


def transformer_blocks(model) -> list:
    """Modules whose class HF lists in ``_no_split_modules`` (the decoder layers), in model order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def checkpoint_every_kth_block(model, every: int) -> tuple[int, int]:
    """Leave gradient checkpointing on for blocks 0, k, 2k, ... only (torchtitan's selective layer
    checkpointing): the others keep their activations, so backward recomputes 1/k of the forward instead of
    all of it, for the memory those activations take. Call after transformers enabled checkpointing.
    Returns (blocks still checkpointed, blocks that checkpoint at all)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return sum(layer.gradient_checkpointing for layer in layers), len(layers)


def keep_deepspeed_hooks_out_of_compile(model) -> int:
    """Make dynamo call DeepSpeed's module hooks instead of tracing them; returns how many were wrapped.

    ZeRO-3 gathers and frees each submodule's weights in forward hooks. Traced into a compiled block, those
    hooks' Python state (module stacks, coordinator objects, grad mode) turns into guards that fail from call
    to call, and dynamo gives up after its recompile limit and runs the block eagerly. Wrapped in
    ``torch.compiler.disable`` they become graph breaks: the block compiles into the pieces between the
    weight fetches (norms, RoPE, activations, residual adds fused), the same graphs for every layer.
    """
    import torch
    wrapped = 0
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__module__", "").startswith("deepspeed") and not getattr(hook, "_tk_eager", False):
                    hooks[key] = torch.compiler.disable(hook)
                    hooks[key]._tk_eager = True
                    wrapped += 1
    return wrapped
