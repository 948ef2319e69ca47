"""Batching: pad with the tokenizer's pad id (never a made-up 0), labels with IGNORE_INDEX."""
import torch

from .encode import IGNORE_INDEX


def sft_collate_fn(batch: list) -> dict:
    """Items carry ``input_ids``, ``labels`` and the ``pad_token_id`` of the tokenizer that made them."""
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
