"""tk list-dataset-format: the record formats a config's ``dataset_map_fn`` can name."""
from ..registry import MAP_FNS


def dataset_formats() -> list:
    """``(name, one-line description)`` for every registered map fn."""
    from ..data import formats  # noqa: F401  (registers the map fns)
    return [(name, (fn.__doc__ or "").strip().splitlines()[0].replace("``", "")) for name, fn in sorted(MAP_FNS.module_dict.items())]


def run(args) -> int:
    formats = dataset_formats()
    width = max(len(name) for name, _ in formats)
    for name, description in formats:
        print(f"{name:<{width}}  {description}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("list-dataset-format", help="list the dataset formats (map fns)")
    parser.set_defaults(func=run)
