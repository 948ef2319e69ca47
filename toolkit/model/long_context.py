"""``SupervisedFinetune``'s long-context switches: checked, then applied to the HF model.

- ``loss_chunk_tokens``: the LM head + cross-entropy in chunks (:func:`.loss.head_cross_entropy`)
- ``offload_activations``: checkpointed block inputs in host memory (:mod:`.offload`)
- ``tiled_mlp``: each block's MLP over tiles of the sequence (:mod:`.tiled_mlp`)
- ``upcast_unquantized=False``: QLoRA keeps a bf16 residual stream (:func:`restore_dtypes`)
- ``recompute_attention=False``: checkpointing keeps the attention kernel's outputs (:mod:`.selective_checkpoint`)

docs/long_context.md has the memory arithmetic and the commands.
"""
from __future__ import annotations

from ..errors import UserError
from .offload import ActivationOffloader, offload_checkpointed_inputs
from .selective_checkpoint import checkpoint_saving_attention
from .tiled_mlp import DEFAULT_TILE_TOKENS, tile_mlps


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"model.{name} = {value!r} must be a positive number of tokens; set it to one "
                        f"(e.g. 8192) or remove it")
    return value


def check_options(gradient_checkpointing: bool, offload_activations: bool, tiled_mlp,
                  loss_chunk_tokens, recompute_attention: bool = True,
                  checkpoint_every: int = 1) -> tuple[int | None, int | None]:
    """(MLP tile tokens or None, loss chunk tokens or None) from the user's settings; one-line UserError
    for a value that cannot work."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise UserError(f"model.checkpoint_every = {checkpoint_every!r} must be a whole number >= 1 (1: checkpoint "
                        f"every block, 2: every second one, ...)")
    if checkpoint_every > 1 and not gradient_checkpointing:
        raise UserError(f"model.checkpoint_every={checkpoint_every} picks which blocks gradient checkpointing "
                        f"recomputes; set model.gradient_checkpointing=True as well")
    if offload_activations and not gradient_checkpointing:
        raise UserError("model.offload_activations=True moves the inputs that gradient checkpointing keeps; "
                        "set model.gradient_checkpointing=True as well")
    if not recompute_attention and not gradient_checkpointing:
        raise UserError("model.recompute_attention=False chooses what gradient checkpointing recomputes; "
                        "set model.gradient_checkpointing=True as well (without it nothing is recomputed)")
    tile = None
    if tiled_mlp is True:
        tile = DEFAULT_TILE_TOKENS
    elif tiled_mlp is not False and tiled_mlp is not None:
        tile = _positive("tiled_mlp", tiled_mlp)
    chunk = None if loss_chunk_tokens is None else _positive("loss_chunk_tokens", loss_chunk_tokens)
    return tile, chunk


def apply_long_context(model, offload_activations: bool, tile_tokens: int | None,
                       recompute_attention: bool = True) -> tuple:
    """Apply the switches to ``model`` (after its adapter and after compiling its blocks). Returns (the
    offloader or None, log lines)."""
    lines, offloader = [], None
    if not recompute_attention:  # one checkpoint function that also offloads, where both are on
        offloader = ActivationOffloader() if offload_activations else None
        count = checkpoint_saving_attention(model, offloader)
        if count == 0:
            raise UserError(f"model.recompute_attention=False: {type(model).__name__} has no decoder layer "
                            f"that transformers checkpoints (GradientCheckpointingLayer; remote-code models have "
                            f"their own), so there is nothing to checkpoint selectively; remove recompute_attention")
        lines.append(f"recompute_attention=False: {count} checkpointed blocks keep their attention output; "
                     f"backward recomputes the rest" + (" (their inputs in host memory)" if offloader else ""))
    elif offload_activations:
        offloader = ActivationOffloader()
        count = offload_checkpointed_inputs(model, offloader)
        if count == 0:
            raise UserError(f"model.offload_activations=True: {type(model).__name__} has no decoder layer that "
                            f"transformers checkpoints (GradientCheckpointingLayer; remote-code models have their "
                            f"own), so there is no block input to offload; remove offload_activations")
        lines.append(f"offload_activations=True: the checkpointed inputs of {count} blocks go to host memory")
    if tile_tokens:
        count = tile_mlps(model, tile_tokens)
        if count == 0:
            raise UserError(f"model.tiled_mlp: no per-token MLP (a block's `mlp` child named ...MLP) found in "
                            f"{type(model).__name__}; remove tiled_mlp from the model")
        lines.append(f"tiled_mlp: {count} MLPs run over tiles of {tile_tokens} tokens")
    return offloader, lines


def restore_dtypes(model, loaded: dict) -> int:
    """Cast parameters back to the dtype they were loaded in (``{name: dtype}``); returns how many changed.

    peft's ``prepare_model_for_kbit_training`` casts every weight bitsandbytes left unquantized (embeddings,
    norms, LM head) to fp32. The fp32 embedding output then makes the residual stream between blocks fp32,
    which doubles what gradient checkpointing keeps (256k tokens x 4096 x 32 layers: 128 GiB instead of 64).
    Keeping them bf16 is what bf16 LoRA does; norms still compute in fp32 inside.
    """
    changed = 0
    for name, param in model.named_parameters():
        dtype = loaded.get(name)
        if dtype is not None and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
            changed += 1
    return changed
