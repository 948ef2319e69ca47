"""tk check-custom-dataset CFG: read and encode every record of the config's training data, report each bad one.

Prints one line per bad record (file, record index, reason, line), then a summary; exit code 1 if any
record is bad, 0 if all are good. Nothing is cached or trained.
"""
from __future__ import annotations

from ..config import CfgOptions, load_config
from ..errors import UserError


def dataset_settings(cfg) -> dict:
    """The ``build_sft_dataset`` settings of the config's ``train_dataloader.dataset``."""
    dataset = cfg.get("train_dataloader", {}).get("dataset")
    if not isinstance(dataset, dict) or "source" not in dataset:
        raise UserError("the config's train_dataloader.dataset has no 'source': tk reads the data from "
                        "build_sft_dataset's settings (source, map_fn, template, ...)")
    return dataset


def check(cfg) -> tuple[int, list, list]:
    """``(records, bad record lines, notes)`` for the config's training data."""
    import numpy as np

    from ..data.dataset import map_records, resolve_map_fn
    from ..data.encode import encode_conversations
    from ..data.sources import load_records
    from ..data.templates import get_template
    from ..model.loader import build_tokenizer

    settings = dataset_settings(cfg)
    source, max_length = settings["source"], settings.get("max_length", 2048)
    records = load_records(source, tolerant=True)
    conversations, problems = map_records(records, resolve_map_fn(settings.get("map_fn")), source)
    notes = []
    if conversations:
        tokenizer = build_tokenizer(settings["tokenizer"])
        encoded = encode_conversations(conversations, tokenizer, get_template(settings.get("template", "chatml")),
                                       max_length + 1, system=settings.get("system"))
        too_long = int((encoded.lengths > max_length).sum())
        untrained = int((encoded.num_trained == 0).sum())
        if too_long:
            action = "dropped" if settings.get("drop_long_samples") else "truncated"
            notes.append(f"{too_long} samples are longer than max_length={max_length} ({action})")
        if untrained:
            notes.append(f"{untrained} samples have no trained token (dropped)")
        notes.append(f"tokens per sample: median {int(np.median(encoded.lengths))}, "
                     f"max {int(encoded.lengths.max())} (counted up to max_length + 1)")
    return len(records), problems, notes


def run(args) -> int:
    cfg = load_config(args.config, args.cfg_options)
    total, problems, notes = check(cfg)
    for line in problems:
        print(line)
    for note in notes:
        print(f"note: {note}")
    print(f"{total} records, {total - len(problems)} good, {len(problems)} bad")
    return 1 if problems else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("check-custom-dataset", help="check every record of a config's data")
    parser.add_argument("config", help="config file or shipped config name")
    parser.add_argument("--cfg-options", nargs="+", action=CfgOptions, metavar="KEY=VALUE",
                        help="override config settings, e.g. train_dataloader.dataset.source=my.jsonl")
    parser.set_defaults(func=run)
