"""Checks before training starts, so a mistake costs seconds and leaves nothing behind.

``build_datasets`` builds the training (and validation) data before the runner exists: a bad record or an
empty file is reported before mmengine creates the work dir, and the runner then gets the very datasets
built here (``hand_to_runner``), so nothing is processed twice. ``check_work_dir`` proves the work dir
can be written; ``check_free_space`` compares the free disk with the size a checkpoint will have.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mmengine.config import Config

from ..errors import UserError

#: room kept free besides one checkpoint (logs, the loss plot, tensorboard events)
_MARGIN_BYTES = 64 * 2**20


def build_datasets(cfg: Config) -> dict:
    """``{"train": dataset, "val": dataset}`` built exactly as the runner would build them."""
    import copy

    from mmengine.registry import DATASETS
    built = {}
    for split, key in (("train", "train_dataloader"), ("val", "val_dataloader")):
        dataset_cfg = (cfg.get(key) or {}).get("dataset")
        if isinstance(dataset_cfg, dict):
            built[split] = DATASETS.build(copy.deepcopy(dataset_cfg))
    return built


def hand_to_runner(runner, datasets: dict) -> None:
    """Give the runner the datasets built by ``build_datasets`` instead of their configs.

    mmengine deep-copies a dataloader config before building it; a built dataset is shared, not copied.
    """
    for split, attribute in (("train", "_train_dataloader"), ("val", "_val_dataloader")):
        loader = getattr(runner, attribute, None)
        if split in datasets and isinstance(loader, dict) and isinstance(loader.get("dataset"), dict):
            dataset = datasets[split]
            dataset.__deepcopy__ = lambda memo, dataset=dataset: dataset
            loader["dataset"] = dataset


def check_work_dir(work_dir) -> Path:
    """Create the work dir and write a probe file in it; one line if either fails."""
    folder = Path(work_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tk-write-probe-"):
            pass
    except OSError as exc:
        raise UserError(f"work dir {folder} is not writable ({exc.strerror or type(exc).__name__}); "
                        f"choose another --work-dir") from None
    return folder


def saves_checkpoints(cfg: Config) -> bool:
    """False when the config turns the checkpoint hook off (``default_hooks.checkpoint = None``)."""
    hooks = cfg.get("default_hooks") or {}
    return "checkpoint" not in hooks or hooks["checkpoint"] is not None


def checkpoint_bytes(model) -> int:
    """An estimate of one checkpoint: the saved weights, plus Adam's two fp32 states per trainable weight."""
    inner = getattr(model, "module", model)
    saved = sum(t.numel() * t.element_size() for t in inner.state_dict().values() if hasattr(t, "numel"))
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    return saved + 2 * 4 * trainable


def check_free_space(work_dir, needed: int) -> None:
    free = shutil.disk_usage(work_dir).free
    if free < needed + _MARGIN_BYTES:
        raise UserError(f"work dir {work_dir} has {_size(free)} free but a checkpoint (and the logs) need about "
                        f"{_size(needed + _MARGIN_BYTES)}; free some space or choose another --work-dir")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

