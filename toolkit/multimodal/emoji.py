"""Real captioned images, offline: the emoji of Debian's ``fonts-noto-color-emoji`` rendered with Pillow
and named by ``unicodedata`` (``U+1F34C`` -> "banana").

Made once under ``cache_root()/data/noto-emoji-v2``: ``images/<codepoint>.png`` (the glyph at its
native 109 px, centred on white) and ``alt/<codepoint>.png`` (the same glyph drawn smaller, shifted, on a
tinted background: new pictures of known emoji), plus jsonl files in the sharegpt / Qwen-VL format:

- ``names_train.jsonl``  "Picture 1: <img>images/1f34c.png</img>\\nWhat is this emoji called?" -> "banana"
- ``captions_train.jsonl`` the same pictures -> "An emoji of a banana." (projector pre-training)
- ``names_test_seen.jsonl`` the ``alt`` pictures of the training emoji (held-out images)
- ``names_test_unseen.jsonl`` every 10th emoji, never trained on (held-out emoji)
- ``small_*``: the same for the ~110 animal and food emoji (U+1F400-1F43F, U+1F345-1F37F), a set small
  enough to learn by heart in a few minutes on a CPU
"""
from __future__ import annotations

import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

from ..assets import _file_lock
from ..errors import UserError
from ..paths import cache_root
from .data import register_packaged_source

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the bitmap strike size of Noto Color Emoji (the only size FreeType can draw it at)
QUESTION = "What is this emoji called?"
#: Single code points that are emoji; skin-tone modifiers and regional-indicator letters left out.
RANGES = [(0x2600, 0x27C0), (0x1F300, 0x1F3FB), (0x1F400, 0x1F650), (0x1F680, 0x1F700), (0x1F90C, 0x1FB00)]
SMALL = [(0x1F400, 0x1F440), (0x1F345, 0x1F380)]
SPLITS = ("names_train", "captions_train", "names_test_seen", "names_test_unseen")
SPLITS = SPLITS + tuple(f"small_{split}" for split in SPLITS)


def emoji_folder() -> Path:
    """The rendered dataset (made on first use)."""
    target = cache_root() / "data" / "noto-emoji-v2"
    if (target / "names_train.jsonl").is_file():
        return target
    if not FONT.is_file():
        raise UserError(f"the emoji data needs {FONT}: apt-get install fonts-noto-color-emoji")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".noto-emoji.lock"):
        if not (target / "names_train.jsonl").is_file():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                _render(Path(tmp) / "out")
                shutil.rmtree(target, ignore_errors=True)
                (Path(tmp) / "out").rename(target)
    return target


def _draw(char, font, size=(136, 128), scale=1.0, offset=(0, 0), background=(255, 255, 255)):
    from PIL import Image, ImageDraw
    glyph = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), char, font=font, embedded_color=True)
    if scale != 1.0:
        glyph = glyph.resize((round(136 * scale), round(128 * scale)))
    canvas = Image.new("RGB", size, background)
    x, y = (size[0] - glyph.width) // 2 + offset[0], (size[1] - glyph.height) // 2 + offset[1]
    canvas.paste(glyph, (x, y), glyph)
    return canvas


def _render(out: Path) -> None:
    from PIL import ImageFont
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    missing = _draw("\ue000", font).tobytes()  # what the font draws for a code point it lacks
    (out / "images").mkdir(parents=True)
    (out / "alt").mkdir()
    rows = {split: [] for split in SPLITS}

    def add(split, record):
        rows[split].append(record)
        if any(a <= code < b for a, b in SMALL):
            rows[f"small_{split}"].append(record)

    count = 0
    for start, end in RANGES:
        for code in range(start, end):
            char, name = chr(code), unicodedata.name(chr(code), "").lower()
            if not name:
                continue
            image = _draw(char, font)
            if image.tobytes() == missing or image.getextrema() == ((255, 255),) * 3:
                continue
            stem = f"{code:x}"
            image.save(out / "images" / f"{stem}.png")
            count += 1
            if count % 10 == 0:  # a held-out emoji: never trained on
                add("names_test_unseen", _record(f"images/{stem}.png", name))
                continue
            add("names_train", _record(f"images/{stem}.png", name))
            add("captions_train", _record(f"images/{stem}.png", f"An emoji of {_article(name)} {name}.", ""))
            tint = (235 + code % 20, 245 - code % 13, 230 + code % 25)
            _draw(char, font, scale=0.7, offset=(code % 9 - 4, code % 7 - 3), background=tint).save(
                out / "alt" / f"{stem}.png")
            add("names_test_seen", _record(f"alt/{stem}.png", name))
    for split, records in rows.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def _record(image: str, answer: str, question: str = QUESTION) -> dict:
    prompt = f"Picture 1: <img>{image}</img>\n{question}".rstrip()
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def emoji_records(split: str) -> list:
    with open(emoji_folder() / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


for _split in SPLITS:  # packaged sources: 'emoji-names_train', ...; image paths relative to emoji_folder()
    register_packaged_source(f"emoji-{_split}", lambda split=_split: emoji_records(split), emoji_folder)
