"""Safe loading of training checkpoints: ``torch.load(weights_only=True)`` with mmengine's types allowed.

mmengine checkpoints hold, besides tensors, its log buffers (``HistoryBuffer``) and numpy scalars.
A ``HistoryBuffer`` pickles its dict of bound statistics methods, which needs ``builtins.getattr`` to
unpickle: allowing that would defeat ``weights_only``. So tk gives ``HistoryBuffer`` a reduce made of
plain lists, and allow-lists only that constructor and numpy's scalar/array types. mmengine's own
resume (which calls ``torch.load`` with torch's safe default) then works too.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

_ALLOWED = False


def _history_buffer_reduce(buffer):
    return type(buffer), (buffer._log_history.tolist(), buffer._count_history.tolist(), buffer.max_length)


def allow_mmengine_checkpoints() -> None:
    """Call before saving or loading checkpoints (the runner glue and the loaders do)."""
    global _ALLOWED
    if _ALLOWED:
        return
    from mmengine.logging import HistoryBuffer
    HistoryBuffer.__reduce__ = _history_buffer_reduce
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    torch.serialization.add_safe_globals(allowed)
    _ALLOWED = True


def load_checkpoint(path) -> dict:
    """The whole checkpoint dict of an mmengine ``.pth`` file, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; give an iter_N.pth file from the run's work dir")
    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
        raise UserError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {reason}); give an iter_N.pth "
                        f"that tk train wrote") from None


def load_model_state(path) -> dict:
    checkpoint = load_checkpoint(path)
    return checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint


# ---- crash safety: a checkpoint is complete or absent ----------------------------------------------------

def partial_name(filename: str) -> str:
    """The temporary name a checkpoint is written under, in the same folder, until it is complete."""
    return f".{filename}.partial-{os.getpid()}"


def publish(partial: Path, final: Path) -> None:
    """Flush ``partial`` to disk and rename it to ``final`` (one atomic step on a POSIX file system)."""
    if partial.is_file():
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    os.replace(partial, final)


def write_text_atomically(path, text: str) -> None:
    path = Path(path)
    partial = path.with_name(partial_name(path.name))
    partial.write_text(text)
    publish(partial, path)


def is_complete(path) -> bool:
    """Whether a checkpoint is whole: torch.save writes a zip, whose directory comes last; a DeepSpeed
    checkpoint is a folder of such files, with at least one ``*model_states.pt``."""
    path = Path(path)
    if path.is_dir():
        parts = list(path.rglob("*.pt"))
        return any(p.name.endswith("model_states.pt") for p in parts) and all(zipfile.is_zipfile(p) for p in parts)
    return path.is_file() and zipfile.is_zipfile(path)


def latest_complete_checkpoint(work_dir) -> Path | None:
    """What ``--resume auto`` resumes from: the checkpoint ``last_checkpoint`` names when it is complete,
    else the newest complete ``iter_N.pth`` / ``epoch_N.pth`` (a run killed by an older tk, or by a
    full disk, may have left a cut one)."""
    work_dir = Path(work_dir)
    pointer = work_dir / "last_checkpoint"
    named = pointer.read_text().strip() if pointer.is_file() else ""
    if named and is_complete(named):
        return Path(named)
    numbered = []
    for candidate in work_dir.glob("*_*.pth"):
        match = re.fullmatch(r"(iter|epoch)_(\d+)\.pth", candidate.name)
        if match:
            numbered.append((int(match.group(2)), candidate))
    for _, candidate in sorted(numbered, reverse=True):
        if is_complete(candidate):
            return candidate
    return None


def _is_local(path: str) -> bool:
    return "://" not in str(path)


class SafeCheckpointLoading:
    """Runner mixin: a checkpoint that ``torch.load(weights_only=True)`` refuses (foreign pickled code, a cut
    or foreign file) ends with one line instead of mmengine's traceback."""

    def load_checkpoint(self, filename, *args, **kwargs):
        import pickle
        try:
            return super().load_checkpoint(filename, *args, **kwargs)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in str(exc):
                raise
            reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
            raise UserError(f"{filename}: not a loadable checkpoint ({type(exc).__name__}: {reason}); resume from "
                            f"an iter_N.pth that tk train wrote") from None


class AtomicCheckpoints:
    """Runner mixin: ``save_checkpoint`` writes under a temporary name and renames when complete."""

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        if not _is_local(out_dir):
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        from mmengine.dist import is_main_process
        partial = partial_name(filename)
        super().save_checkpoint(out_dir, partial, *args, **kwargs)
        if is_main_process():  # mmengine's Runner.save_checkpoint writes on the main process only
            publish(Path(out_dir, partial), Path(out_dir, filename))


class AtomicCheckpointFolders:
    """FlexibleRunner mixin (DeepSpeed, FSDP): every rank writes its part of the checkpoint (a DeepSpeed
    folder) under one temporary name, rank 0's ``.NAME.partial-PID``; once all ranks are done, rank 0 renames
    it. A kill mid-save leaves only the temporary folder, which the next run's start removes."""

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        if not _is_local(out_dir):
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)
        from mmengine.dist import barrier, broadcast_object_list, is_main_process
        owner = [os.getpid()]
        broadcast_object_list(owner)  # one temporary name on every rank: rank 0's
        partial = f".{filename}.partial-{owner[0]}"
        super().save_checkpoint(out_dir, partial, *args, **kwargs)
        barrier()
        if is_main_process():
            final = Path(out_dir, filename)
            if final.is_dir():  # the same step saved again (resumed run): the new one replaces it
                shutil.rmtree(final)
            publish(Path(out_dir, partial), final)
        barrier()


def make_checkpoint_hook_safe(runner) -> None:
    """Reorder mmengine's CheckpointHook of ``runner`` (see ``SafeCheckpointHook``)."""
    from mmengine.hooks import CheckpointHook
    for hook in runner.hooks:
        if type(hook) is CheckpointHook:
            hook.__class__ = _safe_checkpoint_hook()


def _gather_rank_states(runner) -> None:
    """Let the RandomStateHook collect every rank's generator states for the checkpoint about to be written."""
    from .engine.hooks.random_state import RandomStateHook
    for hook in runner.hooks:
        if isinstance(hook, RandomStateHook):
            hook.gather()


@functools.cache
def _safe_checkpoint_hook():
    from mmengine.dist import is_main_process
    from mmengine.hooks import CheckpointHook

    class SafeCheckpointHook(CheckpointHook):
        """mmengine's hook removes the oldest kept checkpoint *before* writing the new one, and rewrites
        ``last_checkpoint`` in place: a kill in between can leave no loadable checkpoint (with
        ``max_keep_ckpts=1``) or an empty pointer. Here the new checkpoint is complete first, then
        ``last_checkpoint`` is replaced atomically, and only then is the oldest one removed."""

        def _save_checkpoint_with_step(self, runner, step, meta):
            doomed = []
            if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    doomed.append(self.keep_ckpt_ids.popleft())
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
            filename = self.filename_tmpl.format(step)
            self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
            runner.message_hub.update_info("last_ckpt", self.last_ckpt)
            _gather_rank_states(runner)  # every rank is here; runner.save_checkpoint writes from rank 0 alone
            runner.save_checkpoint(self.out_dir, filename, self.file_client_args, save_optimizer=self.save_optimizer,
                                   save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
                                   backend_args=self.backend_args, **self.args)
            if not is_main_process():
                return
            write_text_atomically(Path(runner.work_dir, "last_checkpoint"), self.last_ckpt)
            for old in doomed:
                path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
                if self.file_backend.isfile(path):
                    self.file_backend.remove(path)
                elif self.file_backend.isdir(path):  # a DeepSpeed checkpoint folder
                    self.file_backend.rmtree(path)

    return SafeCheckpointHook
