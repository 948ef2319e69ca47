"""Helpers and fixtures of the multimodal tests: small real pictures (solid colours) in a dataset folder and
sharegpt / Qwen-VL records about them. Test modules import the fixtures by name (no conftest here: the
other test folders import their own conftest by module name)."""
import json
from pathlib import Path

import pytest

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ask(*images, question="What colour is it?", answer="red"):
    prompt = "".join(f"Picture {i + 1}: <img>{image}</img>\n" for i, image in enumerate(images)) + question
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def image_folder(tmp_path):
    """``tmp_path/data`` with ``img/<colour>.png`` pictures; the test writes its own jsonl there."""
    from PIL import Image
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(folder / "img" / f"{name}.png")
    return folder


@pytest.fixture
def colour_data(image_folder):
    """12 questions 'what colour is it?' about the three pictures, answered with the colour's name."""
    records = [ask(f"img/{name}.png", answer=name) for name in COLOURS] * 4
    return write_jsonl(image_folder / "colours.jsonl", records)
