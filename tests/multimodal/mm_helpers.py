"""Helpers of the multimodal tests: pictures in sharegpt / Qwen-VL records."""
import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ask(*images, question="What colour is it?", answer="red"):
    prompt = "".join(f"Picture {i + 1}: <img>{image}</img>\n" for i, image in enumerate(images)) + question
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


