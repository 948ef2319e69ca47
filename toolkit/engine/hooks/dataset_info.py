"""Log the training set's size and one decoded sample, with the untrained part marked."""
from __future__ import annotations

from mmengine.hooks import Hook

from ...data.encode import IGNORE_INDEX
from ...data.render import render_masked  # noqa: F401  (also imported from here)
from ...model.loader import build_tokenizer
from ...registry import HOOKS


@HOOKS.register_module()
class DatasetInfoHook(Hook):
    priority = "LOWEST"

    def __init__(self, tokenizer):
        self.tokenizer = build_tokenizer(tokenizer)

    def before_train(self, runner) -> None:
        dataset = runner.train_dataloader.dataset
        sample = dataset[0]
        trained = sum(label != IGNORE_INDEX for label in sample["labels"])
        runner.logger.info(f"train set: {len(dataset)} samples; sample 0 has {len(sample['input_ids'])} tokens, "
                           f"{trained} trained:\n{render_masked(sample['input_ids'], sample['labels'], self.tokenizer)}")
        if runner.val_loop is not None:
            runner.logger.info(f"validation set: {len(runner.val_loop.dataloader.dataset)} samples")
