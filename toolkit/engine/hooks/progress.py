"""A training progress bar with ETA, loss and learning rate (shown only on a terminal, rank 0)."""
from __future__ import annotations

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from tqdm import tqdm

from ...registry import HOOKS


@HOOKS.register_module()
class ProgressBarHook(Hook):
    priority = "LOW"

    def __init__(self, disable: bool | None = None):
        self.disable = disable  # None: only when stderr is a terminal (tqdm's rule), so logs stay clean
        self.bar = None

    def before_train(self, runner) -> None:
        if is_main_process():
            self.bar = tqdm(total=runner.max_iters, initial=runner.iter, desc="train", unit="it",
                            disable=self.disable, dynamic_ncols=True)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{float(outputs['loss'].detach()):.4f}"} if outputs and "loss" in outputs else {}
        lr = runner.message_hub.get_scalar("train/lr") if "train/lr" in runner.message_hub.log_scalars else None
        if lr is not None:
            postfix["lr"] = f"{lr.current():.2e}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def after_train(self, runner) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
