"""Small real pictures (solid colours) in a dataset folder, for the multimodal tests."""
import pytest
from mm_helpers import COLOURS, ask, write_jsonl


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
