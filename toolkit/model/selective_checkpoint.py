"""Gradient checkpointing that keeps the attention kernel's outputs: backward recomputes the rest of the block.

Full checkpointing keeps each decoder layer's input and recomputes the whole layer in backward, attention
included. At long context attention is most of a layer's time (its FLOPs grow with tokens², the rest with
tokens), so recomputing it costs about one more attention forward per layer and step. With
``recompute_attention=False`` each layer is checkpointed with torch's selective checkpoint
(``create_selective_checkpoint_contexts``, torchtitan's "selective op AC"): a policy marks the sdpa kernels
(:data:`ATTENTION_OPS`) MUST_SAVE, everything else PREFER_RECOMPUTE. Forward keeps the layer's input plus
the kernel's outputs (the attention output and its logsumexp: about one more [tokens, hidden] tensor a
layer); backward's recompute runs the norms, projections, RoPE and MLP again and takes the attention
output from what was saved. The numbers are those of full checkpointing: checkpoint restores the RNG state
for the recompute, and the saved ops draw no random numbers (the model's attention dropout must be 0).

tk takes over the checkpoint of each layer (HF's own is switched off) and puts it inside the layer's
``forward``. The arrangement is the same in transformers 5.17 (which checkpoints around ``__call__``) and
5.2x (inside ``forward``), and a compiled block (``block.compile()``) traces the selective checkpoint into
its graph, where AOTAutograd's partitioner applies the same policy (torchtitan's order too: checkpoint,
then compile). With ``offload_activations`` one checkpoint does both (the layer input goes to host memory,
:func:`.offload.offloaded_checkpoint`). The offload hooks do not trace, so in a compiled block they go around
the compiled call and move only the block's input there, not the attention outputs and weights the graph
saves (:func:`checkpoint_saving_attention`).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import UserError
from .offload import _stop_inputs_requiring_grad, offload_input_around_compiled_call, offloaded_checkpoint

#: The kernels ``scaled_dot_product_attention`` dispatches to (flash, memory-efficient, cuDNN, the CPU
#: flash kernel, other backends' fused kernel) and the lower-level forwards some of them call. The math
#: fallback is not one op (it decomposes into matmuls and a softmax), so it is recomputed as before.
ATTENTION_OP_NAMES = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
                      "_efficient_attention_forward", "_cudnn_attention_forward")
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in ATTENTION_OP_NAMES
                          if hasattr(torch.ops.aten, name))

#: What HF configs call the attention dropout (llama-style; GPT-2, GPT-J, StarCoder; BERT-style)
ATTENTION_DROPOUT_NAMES = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")

#: ``attn_implementation`` values whose attention runs as one of :data:`ATTENTION_OPS`
SUPPORTED_ATTENTION = ("sdpa",)


def _dropout_p(op, args, kwargs) -> float:
    """The ``dropout_p`` an attention kernel was called with (every op in :data:`ATTENTION_OPS` has one)."""
    names = [a.name for a in op._schema.arguments]
    index = names.index("dropout_p")
    return kwargs.get("dropout_p", args[index] if index < len(args) else 0.0)


#: How many attention kernels the policy chose to keep (read once after the first training step: 0 means
#: sdpa took its math fallback, which is not one kernel, and the switch changed nothing)
kept_attention = 0


def save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep the attention kernels' outputs, recompute every other op. A kernel
    that draws random numbers (``dropout_p > 0``, whatever the model's config calls its attention dropout) is
    recomputed too: skipping its draws in the recompute would hand every later dropout in the layer other
    masks than forward's, and the gradients would be those of another sample."""
    global kept_attention
    if op in ATTENTION_OPS and not _dropout_p(op, args, kwargs):
        kept_attention += 1
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_contexts():
    """``context_fn`` for non-reentrant ``checkpoint``: a fresh pair of selective-checkpoint contexts per call."""
    return create_selective_checkpoint_contexts(save_attention_policy)


def check_attention(model) -> None:
    """One-line UserError where the attention would not run as a saved kernel, or the saved kernel would
    draw random numbers (attention dropout: the recompute would then draw every later mask from elsewhere)."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise UserError(f"model.recompute_attention=False saves the sdpa attention kernel, but the model runs "
                        f"attn_implementation={implementation!r}; load it with attn_implementation='sdpa' or "
                        f"remove recompute_attention")
    for name in ATTENTION_DROPOUT_NAMES:
        dropout = getattr(config, name, 0.0) or 0.0
        if dropout > 0:
            raise UserError(f"model.recompute_attention=False needs attention dropout 0 (the model's config has "
                            f"{name}={dropout}): a saved kernel's random draws would be skipped in the recompute; "
                            f"set {name}=0.0 or remove recompute_attention")


def _forward_saving_attention(layer, forward, offloader, *args, **kwargs):
    """``forward(*args, **kwargs)`` under the attention-saving checkpoint while training."""
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    function = functools.partial(forward, **kwargs)
    if offloader is not None:
        return offloaded_checkpoint(offloader, function, *args, context_fn=save_attention_contexts)
    return checkpoint(function, *args, use_reentrant=False, context_fn=save_attention_contexts)


def _forward_checkpointed(layer, forward, *args, **kwargs):
    """``forward(*args, **kwargs)`` under plain non-reentrant checkpoint while training."""
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)


def forward_wrapper(module) -> str | None:
    """Which of tk's checkpoint wrappers (``_forward_checkpointed``, ``_forward_saving_attention``) sits on
    ``module.forward``, or None."""
    name = getattr(getattr(module.forward, "func", None), "__name__", None)
    return name if name in ("_forward_checkpointed", "_forward_saving_attention") else None


def unwrap_forward(module) -> None:
    """Put back the forward a checkpoint wrapper was installed over (both take it as their second argument)."""
    module.forward = module.forward.args[1]


def checkpoint_inside_forward(model) -> int:
    """Move each gradient-checkpointed decoder layer's checkpoint from around its ``__call__`` (transformers
    5.17) into its ``forward``, so that a compiled block traces it: AOTAutograd then recomputes inside the
    block's compiled backward graph, instead of torch.utils.checkpoint's Python running the compiled forward
    again from the autograd engine. Same numbers as HF's checkpoint; returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False
        layer.forward = functools.partial(_forward_checkpointed, layer, layer.forward)
    if layers:
        _stop_inputs_requiring_grad(model)
    return len(layers)


def checkpoint_saving_attention(model, offloader=None) -> int:
    """Checkpoint every gradient-checkpointed decoder layer of ``model`` the selective way (module doc);
    with ``offloader`` (an :class:`.offload.ActivationOffloader`) its input also goes to host memory.
    Returns how many layers; 0 means gradient checkpointing is not enabled."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    check_attention(model)
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    for layer in layers:
        layer.gradient_checkpointing = False  # HF's checkpoint (around __call__ or inside forward) stays off
        if offloader is not None and getattr(layer, "_compiled_call_impl", None) is not None:
            # the offload hooks do not trace: they go around the compiled call, and move only the block's input
            layer.forward = functools.partial(_forward_saving_attention, layer, layer.forward, None)
            offload_input_around_compiled_call(layer, offloader)
        else:
            layer.forward = functools.partial(_forward_saving_attention, layer, layer.forward, offloader)
    if layers:  # only reentrant checkpointing needs the embeddings' output to require grad (see there)
        _stop_inputs_requiring_grad(model)
    return len(layers)
