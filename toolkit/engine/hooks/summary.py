"""At the end of training, say where everything is, and write it to ``work_dir/summary.json``.

Last and best checkpoint (with the best validation loss), loss plot, eval-chat answers, tensorboard
events, log file, throughput, and the command that turns the checkpoint into an HF adapter / model.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmengine.dist import master_only
from mmengine.hooks import Hook

from ...registry import HOOKS


def _existing(path) -> str | None:
    return str(path) if path and Path(path).exists() else None


@HOOKS.register_module()
class SummaryHook(Hook):
    priority = "LOWEST"  # after CheckpointHook has saved the last checkpoint

    @master_only
    def after_train(self, runner) -> None:
        info, work_dir = runner.message_hub.runtime_info, Path(runner.work_dir)
        last = info.get("last_ckpt")
        config = getattr(runner.cfg, "filename", None) or "CONFIG"
        summary = {
            "work_dir": str(work_dir),
            "iterations": runner.iter,
            "last_checkpoint": _existing(last),
            "best_checkpoint": _existing(info.get("best_ckpt")),
            "best_val_loss": info.get("best_score") if info.get("best_ckpt") else None,
            "loss_plot": _existing(info.get("loss_plot")),
            "eval_chat": _existing(work_dir / "eval_chat.jsonl"),
            "tensorboard": _existing(Path(runner.log_dir) / "vis_data"),
            "log": _existing(Path(runner.log_dir) / f"{Path(runner.log_dir).name}.log"),
            "throughput": info.get("throughput"),
        }
        chosen = summary["best_checkpoint"] or summary["last_checkpoint"]
        summary["convert"] = (f"tk convert pth_to_hf {config} {chosen} {work_dir / 'hf'}" if chosen else None)
        (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        width = max(len(key) for key in summary)
        lines = [f"  {key.replace('_', ' '):<{width}}  {value}" for key, value in summary.items()
                 if value is not None and key != "throughput"]
        runner.logger.info("run summary (also in summary.json):\n" + "\n".join(lines))
