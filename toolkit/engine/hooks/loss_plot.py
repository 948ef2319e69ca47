"""``work_dir/loss.png``: training loss (raw and smoothed) and validation loss, redrawn as the run goes.

LLaMA-Factory's ``plot_loss`` draws once at the end; this one is refreshed every ``interval`` iterations
and after each validation, so a long run can be watched. The points also go to ``loss_history.json``
and into each checkpoint, so a resumed run's plot continues the interrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmengine.dist import master_only
from mmengine.hooks import Hook

from ...registry import HOOKS


def smooth(values: list, weight: float = 0.9) -> list:
    """Exponential moving average with bias correction (tensorboard's smoothing)."""
    out, last = [], 0.0
    for i, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** i))
    return out


def draw_loss_plot(train: list, val: list, path: Path, title: str = "") -> None:
    """``train`` and ``val`` are [iteration, loss] pairs; written atomically (a viewer never sees half a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, color="#1f77b4", alpha=0.3, linewidth=1, label="train")
        axes.plot(steps, smooth(list(losses)), color="#1f77b4", linewidth=1.5, label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        axes.plot(steps, losses, "o-", color="#d62728", linewidth=1.5, label="validation")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)


@HOOKS.register_module()
class LossPlotHook(Hook):
    priority = "LOW"

    def __init__(self, interval: int = 10, filename: str = "loss.png"):
        self.interval, self.filename = interval, filename
        self.train: list = []
        self.val: list = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if outputs and "loss" in outputs:
            self.train.append([runner.iter + 1, float(outputs["loss"].detach())])
        if self.every_n_train_iters(runner, self.interval):
            self._draw(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if metrics and "val/loss" in metrics and runner.train_loop is not None:
            self.val.append([runner.iter, float(metrics["val/loss"])])
            self._draw(runner)

    def after_train(self, runner) -> None:
        self._draw(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})["loss_history"] = {"train": self.train, "val": self.val}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        history = checkpoint.get("meta", {}).get("loss_history")
        if history and runner._resume:
            self.train, self.val = history["train"], history["val"]

    @master_only
    def _draw(self, runner) -> None:
        work_dir = Path(runner.work_dir)
        (work_dir / "loss_history.json").write_text(json.dumps({"train": self.train, "val": self.val}))
        draw_loss_plot(self.train, self.val, work_dir / self.filename, title=runner.experiment_name)
        runner.message_hub.update_info("loss_plot", str(work_dir / self.filename), resumed=False)
