"""Batching: pad with the tokenizer's pad id (never a made-up 0), labels with IGNORE_INDEX.

Packed samples (items with ``position_ids``) are laid end to end in ONE row, with no attention mask:
transformers then builds the attention from the position ids, which restart at 0 for each document, so
every token attends only within its own document. With sdpa / eager / flex attention that is a
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``); with flash-attention it is
``cu_seqlens`` (``prepare_fa_kwargs_from_position_ids``), which transformers only derives for a batch of
one row. One row works for both; it needs no padding either.
"""
import torch

from .encode import IGNORE_INDEX


def sft_collate_fn(batch: list) -> dict:
    """Items carry ``input_ids``, ``labels`` and the ``pad_token_id`` of the tokenizer that made them."""
    if "position_ids" in batch[0]:
        return packed_collate_fn(batch)
    pad_id = batch[0]["pad_token_id"]
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packed_collate_fn(batch: list) -> dict:
    """Packed rows end to end: ``input_ids``, ``labels``, ``position_ids`` of shape [1, total]."""
    def row(key):
        return torch.tensor([value for item in batch for value in item[key]], dtype=torch.long)[None]
    return {"input_ids": row("input_ids"), "labels": row("labels"), "position_ids": row("position_ids")}
