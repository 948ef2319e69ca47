"""Image conversations -> training samples: token ids with image placeholders, labels, and pictures.

Records are read and mapped like text data (``sharegpt`` keeps Qwen-VL text such as
``Picture 1: <img>cat.png</img>\\nWhat is it?`` verbatim). Each ``<img>path</img>`` becomes
``<img>`` + ``image_tokens`` placeholder ids + ``</img>``; encode.py gives the placeholders the label
IGNORE_INDEX like every prompt token. The model swaps them for the picture's projected features.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.collate import sft_collate_fn
from ..data.dataset import _pad_id, apply_map_fn, resolve_map_fn
from ..data.encode import IGNORE_INDEX, IMAGE, encode_conversations
from ..data.sources import PACKAGED_SOURCES, load_records
from ..data.split import DatasetSubset, split_indices
from ..data.templates import get_template
from ..errors import UserError
from .images import IMAGE_SPAN, ImageError, cached_pixels, resolve_in_folder

IMAGE_TOKEN_ID = -200  # a placeholder's input id: never embedded, replaced by image features
PACKAGED_FOLDERS = {}  # packaged multimodal source name -> function returning its image folder


def dataset_folder(source, image_folder=None) -> Path:
    """Where a dataset's relative image paths start: ``image_folder``, else the data file's folder."""
    if image_folder is not None:
        return Path(image_folder).expanduser()
    if isinstance(source, str) and source in PACKAGED_FOLDERS:
        return PACKAGED_FOLDERS[source]()
    path = Path(str(source)).expanduser()
    return path if path.is_dir() else path.parent


def mark_images(messages: list, folder, resolve=resolve_in_folder) -> tuple[list, list]:
    """``(messages with each <img>path</img> as <img>IMAGE</img>, resolved image paths in order)``."""
    out, paths = [], []
    for message in messages:
        content = message["content"]
        if IMAGE in content:
            raise ImageError("the text contains the reserved character U+E000")

        def swap(match):
            paths.append(resolve(match.group(1).strip(), folder))
            return f"<img>{IMAGE}</img>"

        out.append({**message, "content": IMAGE_SPAN.sub(swap, content)})
    return out, paths


class ImageConversationDataset(torch.utils.data.Dataset):
    """Samples ``{"input_ids", "labels", "pad_token_id", "pixel_values"}``; pictures load from the cache."""

    def __init__(self, samples: list, pad_token_id: int, image_size: int):
        self.samples, self.pad_token_id, self.image_size = samples, pad_token_id, image_size
        self.lengths = [len(s["input_ids"]) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        pixels = [torch.from_numpy(np.load(f)) for f in sample["pixel_files"]]
        empty = torch.zeros((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return {"input_ids": sample["input_ids"], "labels": sample["labels"], "pad_token_id": self.pad_token_id,
                "pixel_values": torch.stack(pixels) if pixels else empty}


def image_collate_fn(batch: list) -> dict:
    """``sft_collate_fn`` + ``pixel_values``: every picture of the batch, in order, uint8 ``[N, 3, S, S]``."""
    out = sft_collate_fn(batch)
    out["pixel_values"] = torch.cat([item["pixel_values"] for item in batch])
    return out


def _complete_images(ids: list, labels: list, image_tokens: int) -> tuple[list, list, int]:
    """Truncation may cut a picture's placeholders short: cut the sample before that picture instead."""
    positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
    whole = len(positions) // image_tokens
    if len(positions) % image_tokens:
        cut = positions[whole * image_tokens]
        ids, labels = ids[:cut], labels[:cut]
    return ids, labels, whole


def build_image_dataset(tokenizer, source, image_folder=None, map_fn="sharegpt", template="chatml", system=None,
                        max_length=2048, image_size=224, image_tokens=49) -> ImageConversationDataset:
    """The training set of an image-conversation source (see the module docstring).

    A record whose picture is missing, unreadable or outside the dataset folder stops the run with
    the record index. Samples with nothing left to train after truncation are dropped.
    """
    from ..model.loader import build_tokenizer
    tokenizer = build_tokenizer(tokenizer)
    folder = dataset_folder(source, image_folder)
    conversations = apply_map_fn(load_records(source), resolve_map_fn(map_fn), source)
    marked, pictures = [], []
    for index, messages in enumerate(conversations):
        try:
            messages, paths = mark_images(messages, folder)
            files = [cached_pixels(p, image_size) for p in paths]
        except ImageError as exc:
            raise UserError(f"{source}: record {index}: {exc}") from None
        marked.append(messages)
        pictures.append(files)
    encoded = encode_conversations(marked, tokenizer, get_template(template), max_length, system=system,
                                   progress=False, image_tokens=(IMAGE_TOKEN_ID, image_tokens))
    samples = []
    for index, files in enumerate(pictures):
        sample = encoded.sample(index)
        ids, labels, whole = _complete_images(sample["input_ids"], sample["labels"], image_tokens)
        if any(label != IGNORE_INDEX for label in labels):
            samples.append({"input_ids": ids, "labels": labels, "pixel_files": [str(f) for f in files[:whole]]})
    if not samples:
        raise UserError(f"{source}: no sample has a trained token within max_length={max_length}; raise it")
    return ImageConversationDataset(samples, _pad_id(tokenizer), image_size)


def build_image_split_dataset(split: str = "train", val_size=0, seed: int = 0, **kwargs):
    """The ``'train'`` or ``'val'`` part of ``build_image_dataset(**kwargs)`` (``val_size`` held out)."""
    dataset = build_image_dataset(**kwargs)
    if not val_size:
        return dataset
    train, val = split_indices(len(dataset), val_size, seed)
    return DatasetSubset(dataset, train if split == "train" else val)


def register_packaged_source(name: str, records, folder) -> None:
    """A named source (``records()`` -> list) whose image paths are relative to ``folder()``."""
    PACKAGED_SOURCES[name] = records
    PACKAGED_FOLDERS[name] = folder
