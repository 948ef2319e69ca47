"""Where tk keeps its user-level cache (converted embedded model, processed datasets)."""
import os
from pathlib import Path


def cache_root() -> Path:
    """``$TK_CACHE``, else ``$XDG_CACHE_HOME/tk``, else ``~/.cache/tk``."""
    if os.environ.get("TK_CACHE"):
        return Path(os.environ["TK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tk"


def configs_root() -> Path:
    """The shipped configs: ``configs/`` beside the package in a checkout, ``toolkit/configs`` when installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("tk's configs folder is missing from this installation")
