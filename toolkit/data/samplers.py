"""``LengthGroupedSampler``: batches of similar length, so little compute goes to padding.

Indices are shuffled each epoch, cut into mega-batches of ``batch_size * world_size * mega_batch_mult``,
each sorted by length, then dealt out as global batches; every rank takes its slice of each global
batch. Order is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import math

import torch
from mmengine.dist import get_dist_info
from mmengine.registry import DATA_SAMPLERS
from torch.utils.data import Sampler


@DATA_SAMPLERS.register_module()
class LengthGroupedSampler(Sampler):
    def __init__(self, dataset, batch_size: int, seed: int | None = None, mega_batch_mult: int = 16,
                 round_up: bool = True):
        rank, world_size = get_dist_info()
        self.rank, self.world_size = rank, world_size
        self.lengths = list(dataset.lengths)
        self.batch_size, self.mega = batch_size, mega_batch_mult
        self.seed = 0 if seed is None else seed
        self.epoch = 0
        global_batch = batch_size * world_size
        self.num_global_batches = math.ceil(len(self.lengths) / global_batch) if round_up \
            else len(self.lengths) // global_batch
        self.total_size = self.num_global_batches * global_batch
        self.num_samples = self.num_global_batches * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_order(self) -> list:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # round up by repeating the first samples
        order = order[: self.total_size]
        global_batch = self.batch_size * self.world_size
        mega_size = global_batch * self.mega
        grouped = []
        for start in range(0, len(order), mega_size):
            mega = sorted(order[start:start + mega_size], key=lambda i: -self.lengths[i])
            grouped.extend(mega)
        batches = [grouped[i:i + global_batch] for i in range(0, len(grouped), global_batch)]
        perm = torch.randperm(len(batches), generator=generator).tolist()  # longest batch not always first
        return [batches[i] for i in perm]

    def __iter__(self):
        for batch in self._global_order():
            yield from batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.num_samples
