"""Image conversations -> samples: exact placeholder positions and labels, several pictures, safe paths."""
import os

import numpy as np
import pytest
import torch

from toolkit.data.encode import IGNORE_INDEX
from toolkit.errors import UserError
from toolkit.multimodal.data import IMAGE_TOKEN_ID, build_image_dataset, image_collate_fn
from toolkit.multimodal.images import decode_image

from mm_helpers import ask, write_jsonl
from mm_helpers import image_folder  # noqa: F401  (fixtures)

N = 4  # placeholder tokens per picture in these tests


def build(tokenizer, source, **kwargs):
    return build_image_dataset(tokenizer, str(source), image_size=32, image_tokens=N, **kwargs)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_two_pictures_become_placeholders_in_place_and_only_the_reply_is_trained(tokenizer, image_folder):
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/red.png", "img/blue.png", question="Colours?",
                                                        answer="red and blue")])
    sample = build(tokenizer, source)[0]
    header = "<|im_start|>user\n"
    expected = (ids(tokenizer, header + "Picture 1: <img>") + [IMAGE_TOKEN_ID] * N
                + ids(tokenizer, "</img>\nPicture 2: <img>") + [IMAGE_TOKEN_ID] * N
                + ids(tokenizer, "</img>\nColours?<|im_end|>\n<|im_start|>assistant\n"))
    reply = ids(tokenizer, "red and blue<|im_end|>")
    tail = ids(tokenizer, "\n")
    assert sample["input_ids"] == expected + reply + tail
    assert sample["labels"] == [IGNORE_INDEX] * len(expected) + reply + [IGNORE_INDEX] * len(tail)
    # the pictures, in order of appearance, preprocessed (uint8, square)
    pixels = sample["pixel_values"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 32, 32)
    assert torch.equal(pixels[0], torch.from_numpy(decode_image(image_folder / "img/red.png", 32)))
    assert torch.equal(pixels[1], torch.from_numpy(decode_image(image_folder / "img/blue.png", 32)))


def test_pictures_in_later_turns_and_in_the_batch_keep_their_order(tokenizer, image_folder):
    two_turns = {"conversations": [
        {"from": "human", "value": "Picture 1: <img>img/green.png</img>\nColour?"}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "And <img>img/red.png</img>?"}, {"from": "gpt", "value": "red"}]}
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/blue.png", answer="blue"), two_turns])
    dataset = build(tokenizer, source)
    batch = image_collate_fn([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    firsts = batch["pixel_values"][:, 0, 16, 16].tolist()  # red channel at the centre: blue, green, red
    assert firsts == [30, 30, 220]
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * N
    assert bool((batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] == IGNORE_INDEX).all())
    trained = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert trained == ids(tokenizer, "green<|im_end|>") + ids(tokenizer, "red<|im_end|>")


@pytest.mark.parametrize("path", ["../outside.png", "img/../../outside.png", "/etc/hostname", "img/link.png"])
def test_a_path_that_leaves_the_dataset_folder_is_refused_with_the_record_index(tokenizer, image_folder, path):
    from PIL import Image
    outside = image_folder.parent / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, image_folder / "img" / "link.png")
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/red.png"), ask(path)])
    with pytest.raises(UserError) as error:
        build(tokenizer, source)
    message = str(error.value)
    assert "record 1:" in message and f"'{path}'" in message and "\n" not in message
    assert ("escapes the dataset folder" in message) or ("absolute" in message)


def test_a_missing_or_unreadable_picture_is_one_line_with_the_record_index(tokenizer, image_folder):
    (image_folder / "img" / "broken.png").write_text("not a picture")
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/gone.png")])
    with pytest.raises(UserError, match=r"record 0: image 'img/gone.png' not found"):
        build(tokenizer, source)
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/red.png"), ask("img/red.png"), ask("img/broken.png")])
    with pytest.raises(UserError, match=r"record 2: image '.*broken.png' cannot be read"):
        build(tokenizer, source)


def test_preprocessed_pictures_are_cached_by_content(tokenizer, image_folder, tk_cache):
    from PIL import Image
    source = write_jsonl(image_folder / "d.jsonl", [ask("img/red.png")])
    build(tokenizer, source)
    cached = sorted((tk_cache / "images").glob("*-32-v*.npy"))
    assert cached and any(np.array_equal(np.load(f), decode_image(image_folder / "img/red.png", 32)) for f in cached)
    Image.new("RGB", (48, 40), (1, 2, 3)).save(image_folder / "img" / "red.png")  # edited: processed again
    assert build(tokenizer, source)[0]["pixel_values"][0, :, 16, 16].tolist() == [1, 2, 3]


def test_truncation_never_keeps_part_of_a_picture(tokenizer, image_folder):
    long_answer = "red " * 30
    source = write_jsonl(image_folder / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "Picture 1: <img>img/red.png</img>\nDescribe."},
        {"from": "gpt", "value": long_answer + "Picture 2: <img>img/blue.png</img>"}]}])
    full = build(tokenizer, source, max_length=512)[0]
    start = [i for i, t in enumerate(full["input_ids"]) if t == IMAGE_TOKEN_ID][N]  # the second picture
    sample = build(tokenizer, source, max_length=start + 2)[0]
    assert sample["input_ids"] == full["input_ids"][:start]
    assert len(sample["pixel_values"]) == 1
