"""New tokens for grounding text (``<ref>``, ``<box>`` ...): added to the tokenizer, given embedding rows
(and LM-head rows) that train.

Off by default: Qwen-VL's ``<ref>plaid shirt</ref><box>(588,499),(725,789)</box>`` is then plain text.
With ``special_tokens`` each tag is one new id; the new rows start at the mean of the old ones (the same
every time, so a reloaded model is rebuilt exactly) and train with the adapter (peft's
``trainable_token_indices``) or with everything else in a full fine-tune.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..model.loader import build_tokenizer, load_tokenizer

GROUNDING_TOKENS = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"]


def load_tokenizer_with_tokens(path: str, special_tokens=(), **kwargs):
    """``load_tokenizer`` with ``special_tokens`` added as single tokens (never split, shown when decoded)."""
    from tokenizers import AddedToken
    tokenizer = load_tokenizer(path, **kwargs)
    if special_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in special_tokens])
    return tokenizer


def add_token_rows(model, tokenizer) -> list:
    """Grow the embeddings (and an untied LM head) to the tokenizer's size; returns the new ids."""
    if tokenizer is None:
        return []
    size = len(build_tokenizer(tokenizer))
    old = model.get_input_embeddings().num_embeddings
    if size <= old:
        return []
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                layer.weight[old:] = layer.weight[:old].mean(dim=0)
    return list(range(old, size))


def embedding_names(model) -> list:
    """Module names of the input embeddings and, when not tied to them, the LM head."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is not None and outputs.weight is inputs.weight
    wanted = [inputs] + ([] if tied or outputs is None else [outputs])
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if any(module is w for w in wanted)]


def with_trainable_tokens(adapter, model, ids: list):
    """The adapter config with the new token rows trainable (peft ``trainable_token_indices``)."""
    indices = {name: list(ids) for name in embedding_names(model)}
    if isinstance(adapter, dict):
        if isinstance(adapter.get("type"), str) and "." not in adapter["type"]:
            raise UserError(f"special_tokens need a peft adapter (LoraConfig) or full fine-tuning, "
                            f"not adapter type {adapter['type']!r}")
        return {**adapter, "trainable_token_indices": indices}
    adapter.trainable_token_indices = indices
    return adapter
