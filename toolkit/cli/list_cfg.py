"""tk list-cfg [-p PATTERN]: the shipped configs."""
from ..paths import configs_root


def shipped_configs(pattern: str | None = None) -> list:
    names = sorted(p.stem for p in configs_root().rglob("*.py") if not p.name.startswith("_"))
    return [n for n in names if pattern is None or pattern.lower() in n.lower()]


def run(args) -> int:
    for name in shipped_configs(args.pattern):
        print(name)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("list-cfg", help="list the shipped configs")
    parser.add_argument("-p", "--pattern", help="only names containing PATTERN (case-insensitive)")
    parser.set_defaults(func=run)
