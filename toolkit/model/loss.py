"""Causal-LM loss that runs the LM head only where a label is trained.

Prompt tokens carry no loss, so their logits (vocab-sized: 49k columns for SmolLM2, 32k+ for 7B models)
are never needed. Computing the head on the trained positions alone gives the same loss and gradients
as ``model(labels=...)`` with less time and memory.

Above ``chunk_tokens`` trained positions the head and the cross-entropy run chunk by chunk, each chunk
under ``torch.utils.checkpoint``: its logits exist only while that chunk is computed (forward) or
recomputed (backward), so a 256k-token sequence never holds 256k x vocab fp32 logits (32 GiB at a 32k
vocab), only one chunk's (1 GiB at 8192 tokens). The loss is the sum over all chunks divided once by the
trained count, so it and its gradients are the unchunked ones up to float rounding. The price is one more
head forward per chunk in backward (about 2% of a 7B step).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.encode import IGNORE_INDEX
from .varlen_attention import packed_attention_kwargs, packed_rows, uses_varlen

#: trained positions per head chunk; 8192 x 32000 fp32 logits = 1 GiB
DEFAULT_CHUNK_TOKENS = 8192


def _plain_decoder(model):
    """(decoder, head) when the model is a plain decoder + linear head, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head is more than a matmul: use the model's own forward
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def _summed_cross_entropy(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def head_cross_entropy(head, hidden, targets, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` ([N, hidden] -> [N, vocab]) against ``targets`` [N].

    At most ``chunk_tokens`` rows of logits exist at a time (None: all at once). N must be > 0.
    """
    count = targets.numel()
    if chunk_tokens is None or count <= chunk_tokens:
        return F.cross_entropy(head(hidden).float(), targets)
    grad = torch.is_grad_enabled()
    total = None
    for piece, target in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if grad:  # keep only the chunk's input; backward recomputes its logits
            # preserve_rng_state: an adapter on the head may use dropout, which the recompute must redraw
            part = checkpoint(_summed_cross_entropy, head, piece, target, use_reentrant=False)
        else:
            part = _summed_cross_entropy(head, piece, target)
        total = part if total is None else total + part
    return total / count


def causal_lm_loss(model, input_ids, labels, attention_mask=None, position_ids=None,
                   inputs_embeds=None, chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy over the trained (label != IGNORE_INDEX) next-token positions.

    ``inputs_embeds`` instead of ``input_ids`` for models that build their own input embeddings (pictures).
    ``chunk_tokens``: see :func:`head_cross_entropy` (the model's own forward, used for heads that are more
    than a linear layer, is not chunked).
    """
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    packed = attention_mask is None and position_ids is not None and uses_varlen(model)
    if packed:  # document boundaries for the varlen kernel, once per forward (varlen_attention.py)
        inputs.update(packed_attention_kwargs(position_ids))
    with packed_rows() if packed else contextlib.nullcontext():
        parts = _plain_decoder(model)
        if parts is None:
            return model(**inputs, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                         use_cache=False).loss
        decoder, head = parts
        hidden = decoder(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        # nothing to learn in this batch: a zero that still reaches every weight, the head's included (under
        # DDP a weight this rank's graph skips would stall the gradient all-reduce)
        return head(hidden[:, :1]).sum() * 0.0
    return head_cross_entropy(head, hidden[:, :-1][keep], targets[keep], chunk_tokens)
