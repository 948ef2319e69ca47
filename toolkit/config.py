"""Loading and checking experiment configs (pure-Python mmengine configs)."""
from __future__ import annotations

import traceback
from pathlib import Path

from mmengine.config import Config, DictAction  # noqa: F401  (DictAction: --cfg-options parsing)

from .errors import UserError
from .paths import configs_root

REQUIRED_KEYS = ("model", "train_dataloader", "train_cfg", "optim_wrapper")


def find_config(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped config (``tk list-cfg``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".py" and (path.parent != Path(".") or path.exists()):
        raise UserError(f"config file {path} does not exist")
    matches = sorted(configs_root().rglob(f"{path.stem}.py"))
    if not matches:
        raise UserError(f"config '{name_or_path}' is neither a file nor a shipped config; see `tk list-cfg`")
    return matches[0]


def load_config(name_or_path: str, options: dict | None = None) -> Config:
    """``Config.fromfile`` with one-line errors for syntax errors and failing imports in the config."""
    path = find_config(name_or_path)
    try:
        cfg = Config.fromfile(str(path))
    except SyntaxError as exc:
        where = exc.filename if exc.filename and not exc.filename.startswith("<") else path
        raise UserError(f"{where}:{exc.lineno}: syntax error in config: {exc.msg}") from None
    except Exception as exc:  # an error raised while executing the config's own code
        line = _line_in(path, exc)
        raise UserError(f"{path}{line}: the config fails to load: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    _check_imports(cfg._cfg_dict, path)
    if options:
        cfg.merge_from_dict(options)
    return cfg


def _check_imports(node, path: Path) -> None:
    """Build every lazily imported name now, so a bad import is reported here with its line."""
    from mmengine.config.lazy import LazyAttr, LazyObject
    if isinstance(node, (LazyObject, LazyAttr)):
        try:
            node.build()
        except Exception as exc:
            where = getattr(node, "location", None) or str(path)
            raise UserError(f"{where}: the config fails to load: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    elif isinstance(node, dict):
        for value in dict.values(node):
            _check_imports(value, path)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _check_imports(value, path)


def _line_in(path: Path, exc: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).name == path.name:
            return f":{frame.lineno}"
    return ""


def validate_config(cfg: Config, check_files: bool = False) -> None:
    """Check what can go wrong before any weights load: keys, names of templates / map fns / adapters.

    ``check_files`` also checks that the data source and a local model path exist.
    """
    from .data.dataset import resolve_map_fn
    from .data.sources import PACKAGED_SOURCES
    from .data.templates import get_template
    from .model.adapters.apply import apply_adapter  # noqa: F401  (registers adapters)
    from .registry import ADAPTERS

    where = Path(cfg.filename).name if cfg.filename else "config"
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise UserError(f"{where}: missing required setting(s) {', '.join(missing)}")
    dataset = cfg.train_dataloader.get("dataset", {})
    if "template" in dataset:
        get_template(dataset["template"])
    if "map_fn" in dataset:
        resolve_map_fn(dataset["map_fn"])
    adapter = cfg.model.get("adapter")
    if isinstance(adapter, dict) and isinstance(adapter.get("type"), str) and adapter["type"] not in ADAPTERS:
        raise UserError(f"{where}: unknown adapter type {adapter['type']!r}; choose one of: "
                        f"{', '.join(sorted(ADAPTERS.module_dict)) or 'LoraConfig (peft)'}")
    if check_files:
        source = dataset.get("source")
        if isinstance(source, str) and source not in PACKAGED_SOURCES and not Path(source).expanduser().exists():
            raise UserError(f"{where}: data source '{source}' does not exist; fix `data_source` in the config")
