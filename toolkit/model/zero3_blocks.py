"""Compiled transformer blocks under DeepSpeed ZeRO-3 that fetch their weights once a block, as one graph.

By default ZeRO-3 gathers each submodule's weights in hooks on that submodule, so a decoder layer runs seven
fetches (q, k, v, o, gate, up, down) and its compiled call breaks into the pieces between them
(:func:`.blocks.keep_deepspeed_hooks_out_of_compile`); the checkpoint then has to sit around the compiled call,
where the recompute runs the whole compiled forward again from torch.utils.checkpoint's Python.

Marked as DeepSpeed "leaf modules" (the mechanism DeepSpeed uses for MoE blocks), the blocks get DeepSpeed's
hooks on themselves only: one fetch of the block's weights before its forward, one before its backward, and
the block's gradients reduced when its backward is done. Nothing of DeepSpeed runs inside a block, so with
torch's own linear (``zero_optimization.memory_efficient_linear: false``, which tk's strategy sets for ZeRO-3
with compiled blocks) the compiled call is one graph with the checkpoint inside it, as on one GPU.

What the compiled graphs save for backward holds no gathered weight: AOTAutograd saves a weight the graph
multiplies with as the parameter object itself, so DeepSpeed's release in forward frees the gathered copy and
backward reads the copy gathered again (tests/engine/test_zero3_compile_cpu.py checks this with Inductor's
partitioner). The LM head outside the blocks, with torch's linear, saves a transposed view of its weight, which
keeps that one gathered matrix (and the buffer it was gathered into) until its backward, right after.

DeepSpeed prefetches the next weights while a block computes only up to ``stage3_prefetch_bucket_size``
parameters; at its default (5e7) that is three of a 7B block's nine weights (q, k, v: 50M of 202M), and the
other six would be gathered when the block starts, with the compute stream waiting on them. tk's preset says
"auto" there, which tk's strategy fills with one block's parameter count (:func:`largest_block_numel`) where
blocks are fetched whole.

``TK_ZERO3_FETCH=module`` keeps the per-submodule fetches, to compare the two on one machine.
"""
from __future__ import annotations

from pathlib import Path

from ..switches import new_or_old
from .blocks import transformer_blocks


def _switch_allows_whole_blocks() -> bool:
    """Whether compiled blocks under ZeRO-3 fetch their weights a block at a time (``TK_ZERO3_FETCH``)."""
    return new_or_old("TK_ZERO3_FETCH", "block", "module")


def fetches_whole_blocks(compile, adapter, offload_activations: bool, quantized: bool) -> bool:
    """Whether a model with these settings has its compiled blocks fetched whole under ZeRO-3: compiled on CUDA,
    not one of tk's circuit adapters (their shared unitary build reads partitioned weights on its own), not with
    ``offload_activations`` (the first block's input would have to require grad, and a grad-requiring input
    cannot leave the GPU), not 4/8-bit (peft's checkpoint would stay inside the compiled graph, measured at 3x
    the memory on one GPU), and ``TK_ZERO3_FETCH`` not ``module``. The model (marking the blocks) and the
    strategy (keeping torch's linear) decide by this one rule."""
    import torch
    from .adapters.apply import is_registered_adapter
    from .sft import wants_compile
    return (wants_compile(compile) and torch.cuda.is_available() and not is_registered_adapter(adapter)
            and not offload_activations and not quantized and _switch_allows_whole_blocks())


def mark_blocks_as_zero3_leaves(model) -> int:
    """Flag each transformer block as a ZeRO-3 leaf module (``_z3_leaf``, what ``deepspeed.utils.z3_leaf_module``
    reads when DeepSpeed installs its hooks); an inert attribute without DeepSpeed. Returns how many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block._z3_leaf = True
    return len(blocks)


def whole_compiled_blocks(model) -> list:
    """Compiled modules that DeepSpeed treats as leaves: its hooks sit on them and on none of their children."""
    return [m for m in model.modules()
            if getattr(m, "_z3_leaf", False) and getattr(m, "_compiled_call_impl", None) is not None]


def block_inputs_require_grad(model) -> bool:
    """Make the input embeddings' output require grad where their weights are frozen (adapters); returns whether
    it had to. DeepSpeed reduces a leaf's gradients in a full backward hook, which fires once the gradients of
    the leaf's inputs exist, or, where no input requires grad (the first block of a frozen model), as soon as
    its outputs' gradients do: before the block's backward, whose weights it then releases. (Not with
    ``offload_activations``, :func:`fetches_whole_blocks`: that input would then stay on the GPU.)"""
    from .offload import REQUIRE_GRADS_HOOK_NAMES
    embeddings = model.get_input_embeddings()
    hooked = any(getattr(hook, "__name__", "") in REQUIRE_GRADS_HOOK_NAMES
                 for hook in embeddings._forward_hooks.values())
    if hooked or any(p.requires_grad for p in embeddings.parameters()):
        return False
    model.enable_input_require_grads()  # transformers' hook (a peft model passes the call on to its base)
    return True


def largest_block_numel(llm: dict) -> int:
    """Parameters of the largest transformer block of the model a config's ``llm`` dict loads (tk's
    ``load_causal_lm`` with ``path``, or ``pretrained_model_name_or_path``), counted on the meta device from its
    config.json: no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM
    from .loader import load_model_config
    from ..assets import resolve_model_path
    path = llm.get("path") or llm.get("pretrained_model_name_or_path")
    if not isinstance(path, str):
        raise ValueError("the model config names no model path (llm.path or llm.pretrained_model_name_or_path)")
    if not (Path(resolve_model_path(path)).expanduser() / "config.json").is_file():
        raise ValueError(f"'{path}' is no local model folder, and a hub is not asked at this point")
    remote = bool(llm.get("trust_remote_code", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_model_config(path, remote), trust_remote_code=remote)
    return max((sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)), default=0)
