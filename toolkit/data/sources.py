"""Reading raw records: a packaged source by name, or the user's own files through ``datasets``."""
from __future__ import annotations

import json
from pathlib import Path

from ..assets import champ_json_path
from ..errors import UserError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _champ_records() -> list:
    problems = json.loads(champ_json_path().read_text(encoding="utf-8"))["problems"]
    return [{"id": key, "problem": p["_text"], "steps": [s["_text"] for s in p["solution"]["steps"]],
             "answer": p["_answer"]} for key, p in problems.items()]


#: Real data that ships with tk's dependencies, by name.
PACKAGED_SOURCES = {"champ": _champ_records}


def describe_source(source) -> dict:
    """What identifies the source's content for the cache key (name, or path + size + mtime)."""
    if isinstance(source, str) and source in PACKAGED_SOURCES:
        return {"packaged": source}
    path = Path(source)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {"path": str(path.resolve()),
            "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]}


def load_records(source) -> list:
    """Raw records as a list of dicts, in file order.

    ``source`` is a packaged name (``"champ"``), a json/jsonl/parquet/csv file, or a folder of per-record
    JSON files (the MATH release layout: ``train/<subject>/<n>.json``).
    """
    if isinstance(source, str) and source in PACKAGED_SOURCES:
        return PACKAGED_SOURCES[source]()
    path = Path(str(source)).expanduser()
    if not path.exists():
        known = ", ".join(sorted(PACKAGED_SOURCES))
        raise UserError(f"data source '{source}' is neither a file/folder nor a packaged source ({known}); "
                        f"fix the path in the config's dataset 'source'")
    if path.is_dir():
        return _folder_records(path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"{path}: unsupported data file type '{path.suffix}'; "
                        f"use one of {', '.join(sorted(FILE_BUILDERS))}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the data file is empty")
    import datasets
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in several types
        raise UserError(f"{path}: could not be read as {builder}: {_root_cause(exc)}") from None
    return loaded.to_list()


def _folder_records(folder: Path) -> list:
    files = sorted(folder.rglob("*.json"))
    if not files:
        raise UserError(f"{folder}: the folder holds no .json files (expected one JSON record per file)")
    records = []
    for file in files:
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: not valid UTF-8 JSON ({exc})") from None
        if not isinstance(record, dict):
            raise UserError(f"{file}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
