"""How much of a step is padding, on real data: unpacked (random order or length-grouped) against packed.

    python3 tools/bench_padding.py [--source champ --map-fn champ] [--max-length 2048] [--batch-size 4]
                                   [--write-lengths FILE]

Builds the training set the way a config does (SmolLM2's tokenizer and chat template, tk's cache), then
walks one epoch of batches exactly as the dataloader forms them and counts the positions a step computes
(batch rows x the longest row, what ``sft_collate_fn`` pads to) against the real tokens in them. Packed
rows are laid end to end in one row with no padding (``packed_collate_fn``); what is left to measure
there is how full the rows are. Prints one JSON line per mode.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.data.dataset import build_sft_dataset  # noqa: E402
from toolkit.data.samplers import LengthGroupedSampler  # noqa: E402


def batches(lengths: list, batch_size: int, mode: str, seed: int = 0) -> list:
    if mode == "length_grouped":
        order = list(LengthGroupedSampler(_Lengths(lengths), batch_size=batch_size, seed=seed))
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class _Lengths:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)


def padding_figures(lengths: list, batch_size: int, mode: str, packed: bool, max_length: int) -> dict:
    steps = batches(lengths, batch_size, mode)
    real = sum(lengths)
    computed = sum(sum(lengths[i] for i in step) if packed else len(step) * max(lengths[i] for i in step)
                   for step in steps)
    out = {"mode": ("packed, " if packed else "") + mode, "batch_size": batch_size, "steps": len(steps),
           "real_tokens": real, "computed_positions": computed, "real_share": round(real / computed, 4)}
    if packed:
        out["row_fill_of_max_length"] = round(real / (len(lengths) * max_length), 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="champ")
    parser.add_argument("--map-fn", default="champ")
    parser.add_argument("--template", default="auto")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--write-lengths", metavar="FILE",
                        help="also write the samples' token lengths (JSON) for tools/bench_packing_gpu.py")
    args = parser.parse_args(argv)
    common = dict(tokenizer=args.tokenizer, source=args.source, map_fn=args.map_fn, template=args.template,
                  max_length=args.max_length)
    unpacked = build_sft_dataset(**common).lengths
    packed = build_sft_dataset(**common, pack_to_max_length=True).lengths
    if args.write_lengths:
        Path(args.write_lengths).write_text(json.dumps(list(unpacked)) + "\n")
    print(json.dumps({"source": args.source, "samples": len(unpacked), "max_length": args.max_length,
                      "packed_rows": len(packed)}))
    for mode in ("random", "length_grouped"):
        print(json.dumps(padding_figures(unpacked, args.batch_size, mode, packed=False, max_length=args.max_length)))
    print(json.dumps(padding_figures(packed, 1, "random", packed=True, max_length=args.max_length)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
