"""``RandomTokenDataset``: fixed-length random token sequences, every token trained.

For speed and memory measurements (weights and data do not change either) and for checks that two ways
of training see the same batches (one GPU vs. ZeRO on several). Items look like ``TokenizedDataset``'s.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class RandomTokenDataset(Dataset):
    """``num_samples`` items; with ``distinct`` set, they cycle through that many different sequences
    (a model can memorise them within one long epoch)."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int = 0, pad_token_id: int = 0,
                 low: int = 3, distinct: int | None = None):
        generator = torch.Generator().manual_seed(seed)
        rows = min(distinct or num_samples, num_samples)
        self.input_ids = torch.randint(low, vocab_size, (rows, seq_len), generator=generator)
        self.num_samples = num_samples
        self.pad_token_id = pad_token_id
        self.lengths = [seq_len] * num_samples  # for LengthGroupedSampler

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        ids = self.input_ids[index % len(self.input_ids)].tolist()
        return {"input_ids": ids, "labels": list(ids), "pad_token_id": self.pad_token_id}
