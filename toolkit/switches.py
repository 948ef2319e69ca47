"""Environment switches that keep the old way of a speed change selectable, to compare both on one machine."""
from __future__ import annotations

import os

from .errors import UserError


def new_or_old(name: str, new: str, old: str) -> bool:
    """Whether environment variable ``name`` picks the ``new`` (default) or the ``old`` way of a speed change;
    any other value is one line."""
    text = os.environ.get(name, new)
    if text not in (new, old):
        raise UserError(f"{name}={text!r} must be '{new}' (the default) or '{old}'; unset it or fix it")
    return text == new
