"""Training hooks for image conversations: the dataset sample shown with its pictures collapsed."""
from __future__ import annotations

from ..data.encode import IGNORE_INDEX
from ..data.render import render_masked
from ..engine.hooks.dataset_info import DatasetInfoHook
from ..registry import HOOKS


@HOOKS.register_module()
class ImageDatasetInfoHook(DatasetInfoHook):
    """DatasetInfoHook for image conversations: sample 0 with its pictures collapsed."""

    def before_train(self, runner) -> None:
        dataset = runner.train_dataloader.dataset
        sample = dataset[0]
        trained = sum(label != IGNORE_INDEX for label in sample["labels"])
        runner.logger.info(
            f"train set: {len(dataset)} samples; sample 0 has {len(sample['input_ids'])} tokens "
            f"({len(sample['pixel_values'])} pictures), {trained} trained:\n"
            f"{render_masked(sample['input_ids'], sample['labels'], self.tokenizer)}")
