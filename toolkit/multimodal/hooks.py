"""Training hooks for image conversations: the dataset sample shown with its pictures collapsed."""
from __future__ import annotations

from ..data.encode import IGNORE_INDEX
from ..data.render import render_masked
from ..engine.hooks.dataset_info import DatasetInfoHook
from ..registry import HOOKS
from .data import IMAGE_TOKEN_ID


def render_with_images(input_ids, labels, tokenizer) -> str:
    """``render_masked`` with each run of image placeholders shown as ``[image: N tokens]``."""
    pieces, start, i = [], 0, 0
    while i <= len(input_ids):
        if i == len(input_ids) or input_ids[i] == IMAGE_TOKEN_ID:
            if i > start:
                pieces.append(render_masked(input_ids[start:i], labels[start:i], tokenizer))
            run = i
            while i < len(input_ids) and input_ids[i] == IMAGE_TOKEN_ID:
                i += 1
            if i > run:
                pieces.append(f"[image: {i - run} tokens]")
            start = i
            if i == len(input_ids):
                break
        else:
            i += 1
    return "".join(pieces)


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
            f"{render_with_images(sample['input_ids'], sample['labels'], self.tokenizer)}")
