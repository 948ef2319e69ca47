"""Save the random number generators' states in every checkpoint, so a resumed run draws the same numbers.

mmengine stores only the seed: after ``--resume`` dropout masks (LoRA dropout, attention dropout) would
start again from the seed instead of where the run stopped. ``TrainLoop`` registers this hook and puts
the saved states back just before the first resumed iteration (after the dataloader has skipped the
batches already trained on, since building the iterator draws from torch's generator too).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from mmengine.hooks import Hook

from ...registry import HOOKS


def capture_rng_state() -> dict:
    """Python, numpy, torch and (where present) CUDA generator states, as plain lists and tensors."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, list(state), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                              pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(rng: dict) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Writes ``checkpoint['meta']['rng_state']`` and, with several processes, ``['rng_state_per_rank']``;
    :meth:`state_for_this_process` gives the loop what to put back.

    mmengine writes a checkpoint from rank 0 only (``before_save_checkpoint`` runs there alone), so tk's
    CheckpointHook calls :meth:`gather` on every rank just before it saves (toolkit/checkpoint.py)."""

    priority = "VERY_LOW"

    def __init__(self):
        self.loaded: dict | None = None
        self.loaded_per_rank: list | None = None
        self.gathered: list | None = None

    def gather(self) -> None:
        """Collective: every rank's states, for the checkpoint written next."""
        from mmengine.dist import all_gather_object, get_world_size
        self.gathered = all_gather_object(capture_rng_state()) if get_world_size() > 1 else None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_world_size
        meta = checkpoint.setdefault("meta", {})
        meta["rng_state"] = capture_rng_state()
        if self.gathered is not None and len(self.gathered) == get_world_size():
            meta["rng_state_per_rank"] = self.gathered
        self.gathered = None

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get("meta", {})
        self.loaded, self.loaded_per_rank = meta.get("rng_state"), meta.get("rng_state_per_rank")

    def state_for_this_process(self) -> dict | None:
        """The loaded states this process draws on: rank r's where the checkpoint has one per rank of the
        same world size; the only one in a single process; else None (re-seeded, not restored)."""
        from mmengine.dist import get_rank, get_world_size
        world = get_world_size()
        if world == 1:
            return self.loaded
        if self.loaded_per_rank is not None and len(self.loaded_per_rank) == world:
            return self.loaded_per_rank[get_rank()]
        return None

