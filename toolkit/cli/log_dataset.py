"""tk log-dataset CFG --show ...: what the model will be trained on, the untrained part visibly marked."""
from __future__ import annotations

from ..builder import build
from ..config import CfgOptions, load_config
from ..data.encode import IGNORE_INDEX
from ..errors import UserError

SHOWS = ("text", "masked_text", "input_ids", "labels", "all")


def describe(sample: dict, tokenizer, show: str) -> list:
    from ..data.render import render_masked
    lines = []
    if show in ("text", "all"):
        lines.append(f"text:\n{tokenizer.decode(sample['input_ids'])}")
    if show in ("masked_text", "all"):
        lines.append(f"masked_text ([no loss]...[/no loss] is not trained):\n"
                     f"{render_masked(sample['input_ids'], sample['labels'], tokenizer)}")
    if show in ("input_ids", "all"):
        lines.append(f"input_ids: {sample['input_ids']}")
    if show in ("labels", "all"):
        lines.append(f"labels: {sample['labels']}")
    if "position_ids" in sample and show == "all":
        starts = [i for i, p in enumerate(sample["position_ids"]) if p == 0]
        lines.append(f"packed: {len(starts)} documents starting at tokens {starts}")
    return lines


def run(args) -> int:
    from ..model.loader import build_tokenizer
    cfg = load_config(args.config, args.cfg_options)
    dataset_cfg = cfg.get("train_dataloader", {}).get("dataset")
    if not isinstance(dataset_cfg, dict) or "tokenizer" not in dataset_cfg:
        raise UserError("the config's train_dataloader.dataset has no 'tokenizer' to build the samples with")
    tokenizer = build_tokenizer(dataset_cfg["tokenizer"])
    dataset = build(dataset_cfg)  # exactly what training gets (and its cache)
    if not 0 <= args.index < len(dataset):
        raise UserError(f"--index {args.index} is outside the dataset's {len(dataset)} samples")
    print(f"{len(dataset)} samples")
    for index in range(args.index, min(args.index + args.num, len(dataset))):
        sample = dataset[index]
        trained = sum(label != IGNORE_INDEX for label in sample["labels"])
        print(f"--- sample {index}: {len(sample['input_ids'])} tokens, {trained} trained")
        print("\n".join(describe(sample, tokenizer, args.show)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("log-dataset", help="print training samples as the model sees them")
    parser.add_argument("config", help="config file or shipped config name")
    parser.add_argument("--show", choices=SHOWS, default="masked_text")
    parser.add_argument("--index", type=int, default=0, help="first sample to show")
    parser.add_argument("-n", "--num", type=int, default=1, help="how many samples to show")
    parser.add_argument("--cfg-options", nargs="+", action=CfgOptions, metavar="KEY=VALUE",
                        help="override config settings")
    parser.set_defaults(func=run)
