"""Editing a copied config the way a user does in an editor (shared by the CLI and multimodal chain tests)."""
import re
from pathlib import Path


def edit_config(path: Path, **settings) -> None:
    """Change top-level settings (``name = value`` lines) of the config at ``path``."""
    text = path.read_text()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, count=1, flags=re.M)
        assert n == 1, f"{key} not found in {path.name}"
    path.write_text(text)
