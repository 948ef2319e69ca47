"""Hold out a validation set: ``val_size`` samples of the training data, or a separate source.

The split is a fixed function of ``seed``, so train and validation never share a sample and a resumed
run sees the same split. Both halves keep ``.lengths`` for the length-grouped sampler.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .dataset import build_sft_dataset


class DatasetSubset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: list):
        self.dataset, self.indices = dataset, list(indices)
        self.lengths = [dataset.lengths[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


def split_indices(n: int, val_size: int | float, seed: int = 0) -> tuple[list, list]:
    """(train, val) indices: ``val_size`` is a count (int >= 1) or a fraction (0 < float < 1)."""
    if isinstance(val_size, float) and 0 < val_size < 1:
        count = max(1, round(n * val_size))
    elif isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0:
        count = val_size
    else:
        raise UserError(f"val_size={val_size!r}: give a sample count (int >= 0) or a fraction (0 < x < 1)")
    if count >= n:
        raise UserError(f"val_size={val_size!r} leaves no training data ({n} samples): lower val_size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


def build_split_dataset(split: str, val_size: int | float = 0, val_source=None, seed: int = 0, **kwargs):
    """The ``'train'`` or ``'val'`` part; ``kwargs`` go to ``build_sft_dataset``.

    With ``val_source`` the validation set is that source (same format, template and length limits)
    and the training set is whole; otherwise ``val_size`` samples are held out of the training data.
    """
    if split not in ("train", "val"):
        raise UserError(f"split={split!r}: use 'train' or 'val'")
    if val_source is not None:
        return build_sft_dataset(**({**kwargs, "source": val_source} if split == "val" else kwargs))
    dataset = build_sft_dataset(**kwargs)
    if not val_size:
        if split == "val":
            raise UserError("a validation set is configured but val_size is 0 and val_data_source is None: "
                            "set one of them, or remove val_dataloader/val_cfg/val_evaluator")
        return dataset
    train, val = split_indices(len(dataset), val_size, seed)
    return DatasetSubset(dataset, train if split == "train" else val)
