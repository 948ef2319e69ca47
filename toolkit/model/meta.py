"""``tk_meta.json``: what tk writes beside an exported adapter or model so chat matches training."""
from __future__ import annotations

import json
from pathlib import Path

META_FILE = "tk_meta.json"


def write_meta(folder, **fields) -> None:
    Path(folder, META_FILE).write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_meta(folder) -> dict:
    path = Path(folder, META_FILE)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
