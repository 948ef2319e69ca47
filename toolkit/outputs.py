"""Writing output folders safely: never into a non-empty folder unless forced, complete or absent."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import UserError


def check_writable_output(out, force: bool = False, flag: str = "--force") -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output folder {out} is not empty; choose a new folder or pass {flag} to replace it")
    return out


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False):
    """Yield a staging folder beside ``out``; it becomes ``out`` only when the block finishes."""
    out = check_writable_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(out.parent, f".{out.name}.partial-*")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():  # the old folder stays whole until the new one takes its name
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(replaced)
        staging.rename(out)
        shutil.rmtree(replaced)
    else:
        staging.rename(out)


def remove_dead_partials(folder, pattern: str = ".*.partial-*") -> list:
    """Delete what killed processes left half-written under a temporary name (their pid no longer runs)."""
    removed = []
    for leftover in Path(folder).glob(pattern):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
