"""``TrainLoop``: give ``max_epochs`` or ``max_iters``; runs iteration-based either way.

Iteration-based loops resume mid-epoch exactly (mmengine skips the batches already seen), and
``--cfg-options train_cfg.max_iters=N`` caps a run written in epochs.
"""
from mmengine.registry import LOOPS
from mmengine.runner import IterBasedTrainLoop

from ..errors import UserError


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
