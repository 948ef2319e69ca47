"""``tk``: dispatches to one small module per subcommand; exit codes propagate."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from ..version import __version__
from . import (chat, check_custom_dataset, compare, convert, copy_cfg, list_cfg, list_dataset_format, log_dataset,
               serve, train, web)

COMMANDS = (list_cfg, copy_cfg, train, convert, chat, web, serve, list_dataset_format, check_custom_dataset,
            log_dataset, compare)


class _OneLineParser(argparse.ArgumentParser):
    """A command-line mistake is one line too (argparse prints the whole usage first): what, and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} -h`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="tk", description="Fine-tune LLMs from one Python config file.")
    parser.add_argument("--version", action="version", version=f"tk {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `tk train` re-runs itself under torchrun
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"tk {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
