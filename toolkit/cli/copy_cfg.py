"""tk copy-cfg NAME DIR: DIR/NAME_copy.py, a config to edit; never overwrites."""
import shutil
from pathlib import Path

from ..config import find_config
from ..errors import UserError


def run(args) -> int:
    source = find_config(args.name)
    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; give a folder to copy the config into")
    target = folder / f"{source.stem}_copy.py"
    if target.exists():
        raise UserError(f"{target} already exists; remove or rename it first (tk never overwrites a config)")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"copied {source.stem} to {target}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("copy-cfg", help="copy a shipped config to edit")
    parser.add_argument("name", help="config name (see tk list-cfg)")
    parser.add_argument("dir", help="folder to copy it into")
    parser.set_defaults(func=run)
