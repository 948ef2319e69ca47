"""Build the training dataset from a config: records -> map fn -> encode -> drop empty -> cache."""
from __future__ import annotations

import hashlib
import logging
import inspect
import json
import shutil
import sys
from pathlib import Path

import torch
from mmengine.logging import print_log
from tqdm import tqdm

from ..errors import UserError
from ..paths import cache_root
from ..registry import MAP_FNS
from . import encode as encode_module
from .encode import encode_conversation
from .formats import FormatError, check_messages
from .sources import describe_source, load_records
from .templates import get_template


def resolve_map_fn(map_fn):
    """A registered format name (``'alpaca'``) or a callable from the config."""
    if map_fn is None or callable(map_fn):
        return map_fn
    fn = MAP_FNS.get(map_fn)
    if fn is None:
        raise UserError(f"unknown dataset map fn {map_fn!r}; choose one of: {', '.join(sorted(MAP_FNS.module_dict))}")
    return fn


def apply_map_fn(records: list, map_fn, source) -> list:
    """Unified conversations, one per record; a bad record stops the run with its index."""
    conversations = []
    for index, record in enumerate(records):
        try:
            mapped = map_fn(record) if map_fn is not None else record
            conversations.append(check_messages(mapped.get("messages") if isinstance(mapped, dict) else None))
        except FormatError as exc:
            raise UserError(f"{source}: record {index}: {exc}") from None
    return conversations


class TokenizedDataset(torch.utils.data.Dataset):
    """Encoded samples (an HF ``datasets.Dataset`` with input_ids/labels) for the DataLoader."""

    def __init__(self, hf_dataset, pad_token_id: int):
        self.data = hf_dataset
        self.pad_token_id = pad_token_id
        self.lengths = hf_dataset["length"]  # for length-grouped sampling

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        return {"input_ids": item["input_ids"], "labels": item["labels"], "pad_token_id": self.pad_token_id}


def build_sft_dataset(tokenizer, source, map_fn=None, template="chatml", system=None, max_length=2048,
                      drop_long_samples=False, use_cache=True) -> TokenizedDataset:
    """The training set a config describes; processed once, then read from the cache.

    Samples longer than ``max_length`` are truncated, or dropped with ``drop_long_samples=True``
    (axolotl's ``drop_long_seq``: no reply is learnt without its end). Either way a sample left with
    no trained token is dropped, and the log says how many were.
    """
    from ..model.loader import build_tokenizer
    tokenizer = build_tokenizer(tokenizer)
    map_fn = resolve_map_fn(map_fn)
    template_dict = get_template(template)
    key = _cache_key(tokenizer, source, map_fn, template_dict, system, max_length, drop_long_samples)
    cache_dir = cache_root() / "datasets" / key
    import datasets
    if use_cache and (cache_dir / "dataset_info.json").is_file():
        print_log(f"dataset: {len(datasets.load_from_disk(str(cache_dir)))} samples from cache {cache_dir}",
                  logger="current")
        return TokenizedDataset(datasets.load_from_disk(str(cache_dir)), _pad_id(tokenizer))

    conversations = apply_map_fn(load_records(source), map_fn, source)
    columns = {"input_ids": [], "labels": [], "length": []}
    dropped = 0
    for messages in tqdm(conversations, desc="encode", unit="sample", mininterval=1.0):
        limit = max_length + 1 if drop_long_samples else max_length
        sample = encode_conversation(messages, tokenizer, template_dict, limit, system=system)
        if sample["num_trained"] == 0 or len(sample["input_ids"]) > max_length:
            dropped += 1
            continue
        columns["input_ids"].append(sample["input_ids"])
        columns["labels"].append(sample["labels"])
        columns["length"].append(len(sample["input_ids"]))
    if not columns["input_ids"]:
        raise UserError(f"{source}: all {dropped} samples were dropped (no trained token within "
                        f"max_length={max_length}); raise max_length or check the data")
    if dropped:
        reason = "longer than" if drop_long_samples else "with no trained token within"
        print_log(f"dataset: dropped {dropped} of {len(conversations)} samples {reason} "
                  f"max_length={max_length}", logger="current", level=logging.WARNING)
    hf_dataset = datasets.Dataset.from_dict(columns)
    if use_cache:
        staging = cache_dir.with_name(cache_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        hf_dataset.save_to_disk(str(staging))
        shutil.rmtree(cache_dir, ignore_errors=True)
        staging.rename(cache_dir)
    print_log(f"dataset: {len(hf_dataset)} samples from {source}", logger="current")
    return TokenizedDataset(hf_dataset, _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:  # llama-style tokenizers have no pad token; EOS is masked anyway
        return tokenizer.eos_token_id
    raise UserError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token in the config")


def _cache_key(tokenizer, source, map_fn, template: dict, system, max_length: int, drop_long: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_id = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = {
        "source": describe_source(source),
        "map_fn": inspect.getsource(map_fn) if map_fn is not None else None,
        "code": inspect.getsource(encode_module) + inspect.getsource(sys.modules[__name__]),
        "template": template,
        "system": system,
        "tokenizer": hashlib.sha256(tokenizer_id.encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "max_length": max_length,
        "drop_long": drop_long,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
