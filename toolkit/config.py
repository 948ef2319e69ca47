"""Loading and checking experiment configs (pure-Python mmengine configs)."""
from __future__ import annotations

import inspect
import re
import traceback
import types
from pathlib import Path

from mmengine.config import Config, DictAction

from .errors import UserError
from .paths import configs_root

REQUIRED_KEYS = ("model", "train_dataloader", "train_cfg", "optim_wrapper")


class CfgOptions(DictAction):
    """``--cfg-options KEY=VALUE ...``; an item without ``=`` is a command-line error, not a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [value for value in values if "=" not in value]
        if bad:
            parser.error(f"{option_string} {bad[0]!r}: write KEY=VALUE, e.g. train_cfg.max_epochs=1")
        super().__call__(parser, namespace, values, option_string)


def find_config(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped config (``tk list-cfg``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.suffix == ".py" and (path.parent != Path(".") or path.exists()):
        raise UserError(f"config file {path} does not exist; check the path, or give a shipped config's name "
                        f"(tk list-cfg)")
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
        raise UserError(f"{where}:{exc.lineno}: syntax error in config: {exc.msg}; fix that line") from None
    except Exception as exc:  # an error raised while executing the config's own code
        line = _line_in(path, exc)
        raise UserError(f"{path}{line}: the config fails to load: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}; fix {'that line' if line else 'the config'}"
                        ) from None
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
                            f"{str(exc).splitlines()[0] if str(exc) else ''}; fix that import") from None
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
        raise UserError(f"{where}: missing required setting(s) {', '.join(missing)}; add them (see a shipped "
                        f"config: tk copy-cfg)")
    dataset = cfg.train_dataloader.get("dataset", {})
    if "template" in dataset:
        get_template(dataset["template"])
    if "map_fn" in dataset:
        resolve_map_fn(dataset["map_fn"])
    adapter = cfg.model.get("adapter")
    if isinstance(adapter, dict) and isinstance(adapter.get("type"), str) and adapter["type"] not in ADAPTERS:
        raise UserError(f"{where}: unknown adapter type {adapter['type']!r}; choose one of: "
                        f"{', '.join(sorted(ADAPTERS.module_dict)) or 'LoraConfig (peft)'}")
    path = Path(cfg.filename) if cfg.filename else None
    for key in ("model", "train_dataloader", "train_cfg", "optim_wrapper", "tokenizer", "param_scheduler"):
        if key in cfg:
            _check_arguments(cfg[key], key, path)
    if check_files:
        source = dataset.get("source")
        if isinstance(source, str) and source not in PACKAGED_SOURCES and not Path(source).expanduser().exists():
            raise UserError(f"{where}: data source '{source}' does not exist; fix `data_source` in the config")
        _check_model_files(cfg, where)


def _check_model_files(cfg: Config, where: str) -> None:
    """A local model / tokenizer folder named in the config exists and is an HF folder."""
    from .model.loader import _existing
    for key, node in (("model.llm", cfg.model.get("llm")), ("tokenizer", cfg.get("tokenizer"))):
        model_path = node.get("path") if isinstance(node, dict) else None
        if isinstance(model_path, str):
            try:
                _existing(model_path)
            except UserError as exc:
                raise UserError(f"{where}: {key}: {exc}") from None
    llm = cfg.model.get("llm")
    if isinstance(llm, dict) and llm.get("quantization_config") is not None:
        import torch
        if not torch.cuda.is_available():
            raise UserError(f"{where}: model.llm.quantization_config (4/8-bit QLoRA) needs a CUDA GPU; on a CPU "
                            f"set quantization_config=None in the config")


#: functions that pass their ``**kwargs`` on to another one, whose parameters are then accepted too
def _forwards():
    from .data.dataset import build_sft_dataset
    from .data.split import build_split_dataset
    return {build_split_dataset: build_sft_dataset}


def _parameters(factory) -> tuple[dict, bool]:
    """``({name: Parameter}, takes_any_keyword)`` of a callable, following ``**kwargs`` to the base class
    (a subclass that passes them up) or to the function it forwards them to."""
    params, seen = {}, set()
    targets = list(factory.__mro__) if isinstance(factory, type) else [factory]
    while targets:
        target = targets.pop(0)
        if target in seen or target is object:
            continue
        seen.add(target)
        try:
            try:
                signature = inspect.signature(target, eval_str=True)
            except Exception:  # an annotation that does not evaluate (e.g. a name under TYPE_CHECKING)
                signature = inspect.signature(target)
        except (TypeError, ValueError):
            return params, True
        for name, param in signature.parameters.items():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                params.setdefault(name, param)
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return params, False
        forward = _forwards().get(target)
        if forward is not None:
            targets.insert(0, forward)
        elif not isinstance(factory, type):
            return params, True
    return params, True


def _expected_type(param):
    """The type(s) a value for ``param`` must have, from its annotation or else its default; None: any."""
    annotation = param.annotation
    if isinstance(annotation, (type, types.UnionType)) and annotation is not inspect.Parameter.empty:
        return annotation
    default = param.default
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):  # an unannotated 0 may well take 0.05 (a fraction, a rate)
        return int | float
    if isinstance(default, str):
        return str
    return None


def _fits(value, expected) -> bool:
    options = expected.__args__ if isinstance(expected, types.UnionType) else (expected,)
    if isinstance(value, bool):
        return bool in options or not any(t in (int, float) for t in options)
    if isinstance(value, int) and float in options:
        return True
    try:
        return isinstance(value, options)
    except TypeError:  # a generic alias inside the union
        return True


def _type_name(expected) -> str:
    options = expected.__args__ if isinstance(expected, types.UnionType) else (expected,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in options)


def _check_arguments(node, key: str, path: Path | None) -> None:
    """Every ``dict(type=callable, ...)`` under ``node``: no setting the callable does not take, and values
    of the type its signature (annotation or default) asks for. Reported with the config line."""
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_arguments(item, f"{key}.{i}", path)
        return
    if not isinstance(node, dict):
        return
    factory = node.get("type")
    if callable(factory) and not isinstance(factory, str):
        params, open_ended = _parameters(factory)
        name = getattr(factory, "__name__", repr(factory))
        for arg, value in node.items():
            if arg == "type":
                continue
            if arg not in params:
                if not open_ended:
                    close = [p for p in params if p not in ("self", "runner", "dataloader")]
                    raise UserError(f"{_where(path, arg)}: {key} has an unknown setting {arg!r} ({name} does not take "
                                    f"it); remove it or use one of: {', '.join(close)}")
                continue
            expected = _expected_type(params[arg])
            if expected is not None and value is not None and not isinstance(value, dict) \
                    and not _fits(value, expected):
                raise UserError(f"{_where(path, arg)}: {key}.{arg} = {value!r} must be {_type_name(expected)}, "
                                f"not {type(value).__name__}; fix the value in the config")
    for arg, value in node.items():
        if arg != "type":
            _check_arguments(value, f"{key}.{arg}", path)


def _where(path: Path | None, name: str) -> str:
    """``file:line`` of the first assignment to ``name`` in the config (a PART 1 setting, or the key in a
    dict), or just the file when ``name`` came from ``--cfg-options``."""
    if path is None:
        return "config"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return str(path)
    pattern = re.compile(rf"(^|[\s(,]){re.escape(name)}\s*=(?!=)")
    for number, line in enumerate(lines, 1):
        if pattern.search(line.split("#")[0]):
            return f"{path}:{number}"
    return str(path)
