"""``TrainLoop``: give ``max_epochs`` or ``max_iters``; runs iteration-based either way.
``ValLoop``: the mean loss over a validation set, for ``val_evaluator = dict(type=ValLoss)``.

Iteration-based loops resume mid-epoch exactly (mmengine skips the batches already seen; tk restores
the random generators, see ``hooks/random_state.py``), and ``--cfg-options train_cfg.max_iters=N`` caps a
run written in epochs.
"""
import logging

import torch
from mmengine.dist import get_world_size
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner import IterBasedTrainLoop
from mmengine.runner import ValLoop as MMEngineValLoop
from mmengine.runner.amp import autocast

from ..data.encode import IGNORE_INDEX
from ..errors import UserError
from .hooks.random_state import RandomStateHook, capture_rng_state, restore_rng_state


@LOOPS.register_module(force=True)
class TrainLoop(IterBasedTrainLoop):
    def __init__(self, runner, dataloader, max_iters: int | None = None, max_epochs: int | None = None,
                 **kwargs):
        if max_iters is None and max_epochs is None:
            raise UserError("train_cfg needs max_epochs or max_iters")
        if max_iters is None:
            if isinstance(dataloader, dict):
                diff_rank_seed = runner._randomness_cfg.get("diff_rank_seed", False)
                dataloader = runner.build_dataloader(dataloader, seed=runner.seed, diff_rank_seed=diff_rank_seed)
            max_iters = int(max_epochs * len(dataloader))
        super().__init__(runner, dataloader, max_iters=max_iters, **kwargs)
        if not any(isinstance(hook, RandomStateHook) for hook in runner.hooks):
            runner.register_hook(RandomStateHook())

    def run(self) -> torch.nn.Module:
        """mmengine's loop, plus: the generators' states put back after skipping the trained batches."""
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        if self._iter > 0:
            print_log(f"Advance dataloader {self._iter} steps to skip data that has already been trained",
                      logger="current", level=logging.WARNING)
            for _ in range(self._iter):
                next(self.dataloader_iterator)
            rng_hooks = [hook for hook in self.runner.hooks if isinstance(hook, RandomStateHook)]
            state = rng_hooks[0].state_for_this_process() if rng_hooks else None
            if state is not None:
                restore_rng_state(state)
            else:
                print_log(f"the checkpoint holds no random generator states for {get_world_size()} process(es) "
                          f"(saved by another world size, or by an older tk): dropout after resuming will differ "
                          f"from an uninterrupted run", logger="current", level=logging.WARNING)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = next(self.dataloader_iterator)
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model


@LOOPS.register_module(force=True)
class ValLoop(MMEngineValLoop):
    """Validation by loss: each batch goes through ``model(..., mode='loss')`` without gradients.

    The evaluator gets ``{'loss_sum', 'tokens'}`` per batch (loss weighted by its trained tokens), so the
    mean does not depend on how samples fall into batches. Validation leaves the random generators as
    it found them: a run with validation trains exactly like one without (and resumes exactly).
    """

    def run(self) -> dict:
        state = capture_rng_state()
        try:
            return super().run()
        finally:
            restore_rng_state(state)

    @torch.no_grad()
    def run_iter(self, idx, data_batch) -> None:
        self.runner.call_hook("before_val_iter", batch_idx=idx, data_batch=data_batch)
        model = self.runner.model.module if is_model_wrapper(self.runner.model) else self.runner.model
        data = model.data_preprocessor(data_batch, False)
        with autocast(enabled=self.fp16):
            loss = model(**data, mode="loss")["loss"]
        tokens = int((data["labels"][:, 1:] != IGNORE_INDEX).sum())
        outputs = [{"loss_sum": float(loss) * tokens, "tokens": tokens}]
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook("after_val_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)
