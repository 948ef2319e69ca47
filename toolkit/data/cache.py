"""The on-disk cache of processed datasets, shared by the processes of one run.

One process per machine (local rank 0) builds and saves; the others poll the disk until the finished
folder appears and load it, so long preprocessing never runs into a collective's time-out. The folder
is written under a temporary name and renamed when complete; a failure leaves a ``.failed`` note that
the waiting processes report instead of waiting forever.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from mmengine.logging import print_log

from ..errors import UserError
from ..paths import cache_root

POLL_SECONDS = 1.0
_STALE_FAILURE_SECONDS = 120  # a .failed note older than this (before we began waiting) is from an old run


def dataset_cache_dir(key: str) -> Path:
    return cache_root() / "datasets" / key


def local_rank() -> int:
    """This process's rank on its machine (torchrun / mmengine set LOCAL_RANK); 0 when not distributed."""
    if os.environ.get("LOCAL_RANK") is not None:
        return int(os.environ["LOCAL_RANK"])
    from mmengine.dist import get_dist_info
    return get_dist_info()[0]


def _is_complete(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file()


def _load(folder: Path):
    import datasets
    return datasets.load_from_disk(str(folder))


def cached_dataset(key: str, build, use_cache: bool = True):
    """``(dataset, from_cache)``: the saved dataset for ``key``, else ``build()``'s result (then saved)."""
    if not use_cache:
        return build(), False
    folder = dataset_cache_dir(key)
    failed = folder.with_name(folder.name + ".failed")
    if _is_complete(folder):
        return _load(folder), True
    if local_rank() != 0:
        _wait_for(folder, failed)
        return _load(folder), True
    failed.unlink(missing_ok=True)
    try:
        dataset = build()
    except BaseException as exc:
        folder.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        raise
    _save(dataset, folder)
    return _load(folder), False


def _save(dataset, folder: Path) -> None:
    staging = folder.with_name(f".{folder.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    try:
        staging.rename(folder)
    except OSError:  # another machine sharing this disk finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(folder):
            raise


def _wait_for(folder: Path, failed: Path) -> None:
    start = last_note = time.time()
    print_log(f"dataset: waiting for local rank 0 to build {folder}", logger="current")
    while not _is_complete(folder):
        if failed.is_file() and failed.stat().st_mtime >= start - _STALE_FAILURE_SECONDS:
            raise UserError(f"local rank 0 failed to build the dataset: {failed.read_text().strip()}")
        if time.time() - last_note > 60:
            last_note = time.time()
            print_log(f"dataset: still waiting for {folder} ({last_note - start:.0f} s)", logger="current")
        time.sleep(POLL_SECONDS)
