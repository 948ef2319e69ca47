"""Reading raw records: a packaged source by name, or the user's own files.

JSON / JSON Lines are read here (record by record, so a bad record is reported with its index and line,
and a truncated file still yields the records before the cut); parquet and csv go through ``datasets``;
YAML (chatterbot-corpus) and plain text (``%``-separated entries, like Debian's ``fortunes``) have small
readers of their own. A record that cannot be read becomes a ``BadRecord`` in its place, so indices stay
those of the file; the map step reports it (or skips it, when asked to).
"""
from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

from ..assets import champ_json_path
from ..errors import UserError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                 ".yml": "yaml", ".yaml": "yaml", ".txt": "text", "": "text"}
_WHITESPACE = re.compile(r"\s*")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours in fortunes-zh
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"


class BadRecord:
    """Stands in for a record that could not be read; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"BadRecord({self.reason!r})"


class Records(list):
    """A list of records that can say where record ``i`` is (``"line 17"``, a file name) for messages."""

    def __init__(self, items=(), locate=None):
        super().__init__(items)
        self._locate = locate

    def where(self, index: int) -> str | None:
        return self._locate(index) if self._locate else None


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


def load_records(source, tolerant: bool = False) -> Records:
    """Raw records, in file order.

    ``source`` is a packaged name (``"champ"``), a json/jsonl/parquet/csv/yaml/txt file (or a text file
    without a suffix), or a folder: of per-record JSON files (the MATH release layout), of YAML files,
    or of text files. With ``tolerant=False`` the first unreadable record is an error; with ``True`` it
    is returned as a ``BadRecord`` in its place.
    """
    if isinstance(source, str) and source in PACKAGED_SOURCES:
        return Records(PACKAGED_SOURCES[source]())
    path = Path(str(source)).expanduser()
    if not path.exists():
        known = ", ".join(sorted(PACKAGED_SOURCES))
        raise UserError(f"data source '{source}' is neither a file/folder nor a packaged source ({known}); "
                        f"fix the path in the config's dataset 'source'")
    if path.is_dir():
        records = _folder_records(path)
        kind = "records"
    else:
        kind = FILE_BUILDERS.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"{path}: unsupported data file type '{path.suffix}'; "
                            f"use one of {', '.join(s for s in sorted(FILE_BUILDERS) if s)} or a folder")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the data file is empty; check the path, or add records to it")
        records = _FILE_READERS[kind](path)
    if not records:
        raise UserError(f"{path}: the {'folder' if path.is_dir() else 'file'} holds no records; "
                        f"check the path, or add records to it")
    if not tolerant:
        for index, record in enumerate(records):
            if isinstance(record, BadRecord):
                where = records.where(index)
                raise UserError(f"{path}: could not be read as {kind}: record {index}: {record.reason}"
                                + (f" ({where})" if where else ""))
    return records


def _decode(raw: bytes) -> tuple[str, bool]:
    """Text of a file, and whether it held bytes that are not UTF-8 (kept as surrogates to be reported)."""
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8-sig", errors="surrogateescape"), True


def _bad_utf8(text: str) -> BadRecord:
    byte = ord(_SURROGATE.search(text).group()) - 0xDC00
    return BadRecord(f"not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8")


def _read_json(path: Path) -> Records:
    raw = path.read_bytes()  # read once: a JSON Lines file is split into lines from these bytes
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"[":  # JSON Lines in a .json file, or a single object
        return _read_jsonl(raw)
    text, has_bad_bytes = _decode(raw)
    start = _WHITESPACE.match(text).end()
    decoder, records, offsets = json.JSONDecoder(), [], []
    end, i = len(text), start + 1
    while True:
        i = _WHITESPACE.match(text, i).end()
        if i >= end:
            records.append(BadRecord("truncated JSON: the file ends before the closing ']'"))
            offsets.append(end)
            break
        if text[i] == "]" and not records:
            break
        try:
            record, after = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            truncated = exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
            records.append(BadRecord("truncated JSON: the file ends inside this record" if truncated else
                                     f"not valid JSON: {exc.msg} (the records after it were not read)"))
            offsets.append(i)
            break
        if has_bad_bytes and _SURROGATE.search(text, i, after):
            record = _bad_utf8(text[i:after])
        records.append(record)
        offsets.append(i)
        i = _WHITESPACE.match(text, after).end()
        if i < end and text[i] == ",":
            i += 1
        elif i < end and text[i] == "]":
            break
        elif i < end:
            records.append(BadRecord(f"not valid JSON: expected ',' or ']' after record {len(records) - 1}"))
            offsets.append(i)
            break
    return Records(records, _line_locator(text, offsets))


def _line_locator(text: str, offsets: list):
    """``index -> "line N"``; the newline positions are found once, on the first call (errors only)."""
    newlines = []

    def where(index: int) -> str:
        if not newlines:
            newlines.append([m.start() for m in re.finditer("\n", text)])
        return f"line {bisect.bisect_right(newlines[0], offsets[index]) + 1}"
    return where


def _read_jsonl(raw: bytes) -> Records:
    lines = raw.split(b"\n")
    records, line_numbers = [], []
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        line_numbers.append(n + 1)
        try:
            text = line.decode("utf-8-sig" if n == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            records.append(BadRecord(f"not valid UTF-8 (byte 0x{line[exc.start]:02x}); re-save the file as UTF-8"))
            continue
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as exc:
            truncated = n == last and (exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip()))
            records.append(BadRecord("truncated JSON: the file ends inside this record" if truncated
                                     else f"not valid JSON: {exc.msg} (column {exc.colno})"))
    return Records(records, lambda index: f"line {line_numbers[index]}")


def _read_with_datasets(path: Path) -> Records:
    import datasets
    builder = FILE_BUILDERS[path.suffix.lower()]
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in several types
        raise UserError(f"{path}: could not be read as {builder}: {_root_cause(exc)}") from None
    return Records(loaded.to_list(), lambda index: f"row {index + 1}")


def _read_yaml(path: Path) -> Records:
    """chatterbot-corpus layout: ``categories`` + ``conversations`` (lists of lines), one record a dialog.

    Scalars stay strings (YAML's BaseLoader), so ``- yes`` or ``- 42`` are text, as written.
    """
    import yaml
    text, has_bad_bytes = _decode(path.read_bytes())
    if has_bad_bytes:
        raise UserError(f"{path}: {_bad_utf8(text).reason}")
    try:
        document = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
                        f"{getattr(exc, 'problem', None) or exc}; fix the file there") from None
    if isinstance(document, dict) and isinstance(document.get("conversations"), list):
        categories = document.get("categories") or []
        return Records([{"dialog": dialog, "categories": categories} for dialog in document["conversations"]],
                       lambda index: f"{path.name}, conversation {index}")
    if isinstance(document, list):
        return Records(document, lambda index: f"{path.name}, item {index}")
    raise UserError(f"{path}: expected a YAML list, or a mapping with a 'conversations' list "
                    f"(the chatterbot-corpus layout)")


def _read_text(path: Path) -> Records:
    """Entries separated by lines that hold only ``%`` (fortune files); without such lines, paragraphs."""
    text, _ = _decode(path.read_bytes())
    text, previous = text.replace("\r\n", "\n"), None
    while text != previous:  # fortunes-zh nests them: "\x1b[;\x1b[34;1mm"
        text, previous = _ANSI.sub("", text), text
    if re.search(r"^%$", text, flags=re.M):
        entries = re.split(r"^%\n?", text, flags=re.M)
    else:
        entries = re.split(r"\n\s*\n", text)
    entries = [entry.strip("\n") for entry in entries if entry.strip()]
    records = [_bad_utf8(entry) if _SURROGATE.search(entry) else {"text": entry} for entry in entries]
    return Records(records, lambda index: f"{path.name}, entry {index}")


_FILE_READERS = {"json": _read_json, "parquet": _read_with_datasets, "csv": _read_with_datasets,
                 "yaml": _read_yaml, "text": _read_text}


def _folder_records(folder: Path) -> Records:
    """A folder of per-record JSON files (MATH), else of YAML files, else of text files."""
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()]
    json_files = [f for f in files if f.suffix.lower() == ".json"]
    if json_files:
        records = []
        for file in json_files:
            try:
                record = json.loads(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                record = BadRecord(f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x}); re-save it as UTF-8")
            except json.JSONDecodeError as exc:
                record = BadRecord(f"not valid JSON: {exc.msg} (line {exc.lineno})")
            records.append(record)
        return Records(records, lambda index: str(json_files[index].relative_to(folder)))
    by_kind = {}
    for file in files:
        kind = FILE_BUILDERS.get(file.suffix.lower())
        if kind in ("yaml", "text"):  # fortune's .dat index files and .u8 links are neither
            by_kind.setdefault(kind, []).append(file)
    chosen = by_kind.get("yaml") or by_kind.get("text")
    if not chosen:
        raise UserError(f"{folder}: the folder holds no .json, .yml or text files "
                        f"(expected one JSON record per file, YAML dialogs, or text entries)")
    reader = _read_yaml if chosen is by_kind.get("yaml") else _read_text
    records, owners = [], []
    for file in chosen:
        part = reader(file)
        records.extend(part)
        owners.extend((part, i) for i in range(len(part)))
    return Records(records, lambda index: owners[index][0].where(owners[index][1]))


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
