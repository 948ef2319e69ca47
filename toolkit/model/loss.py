"""Causal-LM loss that runs the LM head only where a label is trained.

Prompt tokens carry no loss, so their logits (vocab-sized: 49k columns for SmolLM2, 32k+ for 7B models)
are never needed. Computing the head on the trained positions alone gives the same loss and gradients
as ``model(labels=...)`` with less time and memory.
"""
import torch
import torch.nn.functional as F

from ..data.encode import IGNORE_INDEX


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


def causal_lm_loss(model, input_ids, labels, attention_mask=None, position_ids=None,
                   inputs_embeds=None) -> torch.Tensor:
    """Mean cross-entropy over the trained (label != IGNORE_INDEX) next-token positions.

    ``inputs_embeds`` instead of ``input_ids`` for models that build their own input embeddings (pictures).
    """
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
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
        return hidden.sum() * 0.0  # nothing to learn in this batch; keeps the graph connected
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])
