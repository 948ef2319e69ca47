"""Turn a loaded config into an mmengine Runner for this machine."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from ..checkpoint import (AtomicCheckpointFolders, AtomicCheckpoints, SafeCheckpointLoading,
                          allow_mmengine_checkpoints, latest_complete_checkpoint, make_checkpoint_hook_safe)
from ..errors import UserError
from ..outputs import remove_dead_partials


def _half_precision_weights(cfg: Config) -> str | None:
    """'bfloat16' / 'float16' when every trained weight is loaded in that dtype (full fine-tuning of a
    model loaded in half precision), else None."""
    model = cfg.get("model") or {}
    llm = model.get("llm") if isinstance(model, dict) else None
    if not isinstance(llm, dict) or model.get("adapter") is not None:
        return None
    from ..model.loader import DTYPES
    dtype = DTYPES.get(str(llm.get("dtype", "")).replace("torch.", ""))  # 'bf16' is 'bfloat16' too
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)


def adapt_to_device(cfg: Config) -> None:
    """Settle the optim wrapper for this machine and model.

    Without CUDA, mixed precision falls back to fp32 (mmengine's AMP wrapper needs a GPU); so does
    ``dtype=None`` (the config's ``amp_dtype = None``), which mmengine would read as fp16. Full fine-tuning
    of weights loaded in bf16 trains them in bf16 with the plain wrapper: AMP would add nothing, and its
    gradient scaler cannot unscale bf16 gradients. fp16 weights cannot be trained that way at all.
    """
    from mmengine.optim import AmpOptimWrapper
    wrapper = cfg.optim_wrapper
    if wrapper.get("type") not in (AmpOptimWrapper, "AmpOptimWrapper"):
        return
    half = _half_precision_weights(cfg)
    if half == "float16":
        raise UserError("model.llm.dtype='float16' with full fine-tuning under AmpOptimWrapper: fp16 weights cannot "
                        "be trained with a gradient scaler; load them in 'float32' (mixed precision) or 'bfloat16'")
    if torch.cuda.is_available() and wrapper.get("dtype", "float16") is not None and half is None:
        return
    wrapper["type"] = "OptimWrapper"  # a name, not the class: the config must stay dumpable as text
    for key in ("dtype", "loss_scale"):
        wrapper.pop(key, None)
    reason = ("the weights are bf16 (model.llm.dtype)" if half else
              "amp_dtype is None" if torch.cuda.is_available() else "no CUDA device")
    print_log(f"{reason}: training with OptimWrapper instead of AmpOptimWrapper", logger="current")


def prepare(cfg: Config, work_dir: str | None = None, resume: str | None = None, seed: int | None = None,
            config_path: str | None = None) -> Config:
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / Path(config_path or cfg.filename).stem)
    if resume == "auto":
        resume_auto(cfg)
    elif resume is not None:
        if not Path(resume).exists():
            raise UserError(f"--resume {resume}: no such checkpoint (give a .pth file, or 'auto' for the latest "
                            f"in the work dir)")
        cfg.resume, cfg.load_from = True, resume
    if seed is not None:
        cfg.setdefault("randomness", {})
        cfg.randomness["seed"] = seed
    adapt_to_launch(cfg)
    drop_disabled_validation(cfg)
    return cfg


def resume_auto(cfg: Config) -> None:
    """``--resume auto``: the last COMPLETE checkpoint in the work dir (checkpoint.latest_complete_checkpoint);
    none: start from the beginning. Half-written checkpoints of killed runs are removed."""
    found = latest_complete_checkpoint(cfg.work_dir) if Path(cfg.work_dir).is_dir() else None
    if found is None:
        print_log(f"--resume auto: no checkpoint in {cfg.work_dir} yet, so training starts from the beginning",
                  logger="current", level=logging.WARNING)
        cfg.resume, cfg.load_from = False, None
        return
    from mmengine.dist import is_main_process
    if is_main_process():
        for leftover in remove_dead_partials(cfg.work_dir):
            print_log(f"--resume auto: removed {leftover.name}, a checkpoint a killed run left half-written",
                      logger="current", level=logging.WARNING)
    pointer = Path(cfg.work_dir) / "last_checkpoint"
    if not pointer.is_file() or pointer.read_text().strip() != str(found):
        print_log(f"--resume auto: last_checkpoint does not name a complete checkpoint; resuming from {found}",
                  logger="current", level=logging.WARNING)
    cfg.resume, cfg.load_from = True, str(found)


def drop_disabled_validation(cfg: Config) -> None:
    """``val_size = 0`` and no ``val_data_source`` in a config wired for validation: no validation."""
    dataset = (cfg.get("val_dataloader") or {}).get("dataset") or {}
    if "val_size" in dataset and not dataset.get("val_size") and dataset.get("val_source") is None:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None


def adapt_to_launch(cfg: Config) -> None:
    """Under torchrun: the 'pytorch' launcher, a seed per rank (dropout differs between ranks while the
    sampler keeps one data order), the loss logged as the mean over ranks, and gloo where there is no CUDA."""
    import os
    if "WORLD_SIZE" not in os.environ:
        return
    cfg.launcher = "pytorch"
    if int(os.environ["WORLD_SIZE"]) > 1:
        from . import launch  # noqa: F401  (registers MeanLossHook: by name, the config stays dumpable)
        cfg.setdefault("randomness", {})
        cfg.randomness["diff_rank_seed"] = True
        cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="MeanLossHook")]  # log the mean over ranks
    if not torch.cuda.is_available() and not torch.distributed.is_initialized():
        # mmengine's own setup calls torch.cuda.set_device; a process group made here is used as it is
        torch.distributed.init_process_group("gloo")
        cfg.model_wrapper_cfg = {**(cfg.get("model_wrapper_cfg") or dict(type="MMDistributedDataParallel")),
                                 "device_ids": None}


class _KeepUserConfig:
    """mmengine writes the resolved config to ``work_dir/<config file name>``. When the user's config lives
    in the work dir, that would overwrite it with a re-rendered copy; tk writes ``<name>_resolved.py`` then."""

    def dump_config(self) -> None:
        if not self.cfg.filename:
            return super().dump_config()
        source = Path(self.cfg.filename).resolve()
        target = Path(self.work_dir).resolve() / source.name
        if target == source:
            target = target.with_name(f"{source.stem}_resolved.py")
        self.cfg.dump(str(target))


class TkRunner(AtomicCheckpoints, SafeCheckpointLoading, _KeepUserConfig, Runner):
    """mmengine's Runner; checkpoints are written whole or not at all and loaded without running pickled code;
    the user's config is never replaced."""


def build_runner(cfg: Config) -> Runner:
    allow_mmengine_checkpoints()  # resume loads checkpoints with torch's safe default
    if cfg.get("runner_type") == "FlexibleRunner":  # --deepspeed / --strategy fsdp (engine/strategy.py)
        from mmengine.runner import FlexibleRunner
        if cfg.strategy.get("type") == "DeepSpeedStrategy":
            from .deepspeed_norms import norms_in_fp32
            from .strategy import register_deepspeed_optimizers
            register_deepspeed_optimizers()
            norms_in_fp32()
        bases = (AtomicCheckpointFolders, SafeCheckpointLoading, _KeepUserConfig, FlexibleRunner)
        runner = type("TkFlexibleRunner", bases, {}).from_cfg(cfg)
    else:
        runner = TkRunner.from_cfg(cfg)
    make_checkpoint_hook_safe(runner)
    return runner
