"""Pictures in a chat: ``<img>path</img>`` in a message (or ``tk chat --image PATH``) shown to the model.

In a chat the paths are the user's own: relative to the working directory, or absolute.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.encode import prompt_for_generation
from .data import IMAGE_TOKEN_ID, mark_images
from .images import ImageError, decode_image


def is_multimodal(model) -> bool:
    return getattr(model, "image_tokens", None) is not None


def picture_prefix(paths, start: int = 1) -> str:
    """``Picture 1: <img>a.png</img>\\n...``: how pictures are put before a message (the Qwen-VL form)."""
    return "".join(f"Picture {start + i}: <img>{path}</img>\n" for i, path in enumerate(paths))


def _chat_path(path: str, folder) -> Path:
    resolved = Path(folder, Path(path).expanduser())
    if not resolved.is_file():
        raise ImageError(f"image '{path}' not found")
    return resolved


def image_prompt(model, messages: list, tokenizer, template: dict, system=None) -> tuple[list, dict]:
    """Prompt ids (with image placeholders) and ``{"pixel_values": uint8 [N, 3, S, S]}`` for ``generate``."""
    marked, paths = mark_images(messages, Path.cwd(), resolve=_chat_path)
    ids = prompt_for_generation(marked, tokenizer, template, system=system,
                                image_tokens=(IMAGE_TOKEN_ID, model.image_tokens))
    if not paths:
        return ids, {}
    return ids, {"pixel_values": torch.stack([torch.from_numpy(decode_image(p, model.image_size)) for p in paths])}
