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
    """Writes ``checkpoint['meta']['rng_state']``; keeps the loaded one in ``self.loaded`` for the loop."""

    priority = "VERY_LOW"

    def __init__(self):
        self.loaded: dict | None = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["rng_state"] = capture_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.loaded = checkpoint.get("meta", {}).get("rng_state")
