"""Pictures in conversations: find ``<img>path</img>`` spans, resolve paths safely, load cached pixels.

Paths in a dataset are relative to the dataset's folder and may not leave it (no absolute paths, no
``..``, no symlink that points outside). Images are resized to a square of ``size`` pixels (padded to a
square first, on white, so nothing is cut off) and stored as uint8 ``[3, size, size]`` arrays under
``cache_root()/images``, keyed by the file's content and the preprocessing settings.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..paths import cache_root

IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.S)
PREPROCESS_VERSION = 1  # bump when load_pixels changes what it produces


class ImageError(ValueError):
    """A picture that cannot be used; the dataset builder adds the record index."""


def image_paths(text: str) -> list:
    return [p.strip() for p in IMAGE_SPAN.findall(text)]


def resolve_in_folder(path: str, folder) -> Path:
    """``folder/path`` resolved, refused if it is absolute or leads outside ``folder`` (also via symlinks)."""
    root = Path(folder).resolve()
    if not path or os.path.isabs(path) or Path(path).drive:
        raise ImageError(f"image path '{path}' is absolute; give it relative to the dataset folder {root}")
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ImageError(f"image path '{path}' escapes the dataset folder {root}; keep images inside it")
    if not resolved.is_file():
        raise ImageError(f"image '{path}' not found (looked for {resolved})")
    return resolved


def _square(image, fill=(255, 255, 255)):
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    from PIL import Image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def decode_image(path: Path, size: int) -> np.ndarray:
    """The image as uint8 ``[3, size, size]`` RGB (transparency flattened onto white)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "P"):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            image = _square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def cached_pixels(path, size: int) -> Path:
    """The ``.npy`` file of ``decode_image(path, size)``, made on first use (the key is the file's bytes,
    the size and the code version, so an edited image is processed again)."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    except OSError as exc:
        raise ImageError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    cached = cache_root() / "images" / f"{digest}-{size}-v{PREPROCESS_VERSION}.npy"
    if not cached.is_file():
        pixels = decode_image(path, size)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(staging, "wb") as out:
            np.save(out, pixels)
        staging.replace(cached)
    return cached
