"""The transformer MLP over the sequence in tiles, so its [tokens, intermediate] tensors never exist whole.

A llama MLP (``down(act(gate(x)) * up(x))``) treats every token on its own, so it can run over chunks of
the sequence. Each chunk runs under non-reentrant ``torch.utils.checkpoint``: forward keeps only the chunk's
input, and backward recomputes and differentiates one chunk at a time. At 256k tokens a 7B MLP's gate, up,
activation and product (256k x 11008 each, 5.4 GiB apiece in bf16, plus LoRA's dropped-out copies) shrink
to one chunk's worth. Checkpoint restores the RNG state for each recompute, so LoRA dropout draws the same
masks again; the module's own forward runs on each chunk (peft LoRA layers, bitsandbytes weights untouched).
Arctic Long Sequence Training calls this TiledMLP.
"""
from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from .blocks import transformer_blocks

#: tokens per MLP tile; a 7B MLP tile is then 8192 x 11008 (172 MiB in bf16) per intermediate tensor
DEFAULT_TILE_TOKENS = 8192


def tiled_forward(forward, tokens: int, module, x: torch.Tensor) -> torch.Tensor:
    """``forward(module, x)`` over chunks of ``tokens`` along the sequence (dim -2), concatenated."""
    if x.dim() < 2 or x.shape[-2] <= tokens:
        return forward(module, x)
    pieces = x.split(tokens, dim=-2)
    if torch.is_grad_enabled():
        outs = [checkpoint(forward, module, piece, use_reentrant=False) for piece in pieces]
    else:
        outs = [forward(module, piece) for piece in pieces]
    return torch.cat(outs, dim=-2)


def _mlps(model):
    """The per-token MLP of each transformer block: the ``mlp`` child of the classes HF lists in
    ``_no_split_modules``, when it is a dense MLP (a class named ``...MLP``, not a mixture of experts)."""
    for block in transformer_blocks(model):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and type(mlp).__name__.endswith("MLP"):
            yield mlp


def tile_mlps(model, tokens: int = DEFAULT_TILE_TOKENS) -> int:
    """Run each block's MLP in tiles of ``tokens`` (see module doc). Returns how many MLPs were tiled."""
    count = 0
    for mlp in _mlps(model):
        forward = type(mlp).forward
        mlp.forward = types.MethodType(lambda self, x, _f=forward: tiled_forward(_f, tokens, self, x), mlp)
        count += 1
    return count
