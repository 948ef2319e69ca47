"""How well a model names pictures: greedy replies to held-out image questions vs. the reference answers.

    python -m toolkit.multimodal.evaluate CONFIG_OR_FOLDER [--data emoji-small_names_test_seen] [--limit N]

A config (file or shipped name) is evaluated untrained: its base LLM with a fresh projector ("before");
a folder from ``tk convert pth_to_hf`` / ``merge`` is evaluated as trained ("after"). Prints exact-match
accuracy (case and punctuation ignored) and the mean word-overlap F1, and writes every reply with
``--out FILE`` (jsonl).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from ..data.dataset import apply_map_fn, resolve_map_fn
from ..data.sources import load_records
from .data import dataset_folder
from .images import IMAGE_SPAN, resolve_in_folder


def normalise(text: str) -> list:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def word_f1(reply: str, reference: str) -> float:
    got, want = normalise(reply), normalise(reference)
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def questions(source, map_fn="sharegpt", image_folder=None) -> list:
    """``(prompt messages with absolute image paths, reference reply)`` for each record's first answer."""
    folder = dataset_folder(source, image_folder)
    out = []

    def absolute(span):
        return f"<img>{resolve_in_folder(span.group(1).strip(), folder)}</img>"

    for messages in apply_map_fn(load_records(source), resolve_map_fn(map_fn), source):
        answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = [{**m, "content": IMAGE_SPAN.sub(absolute, m["content"])} for m in messages[:answer]]
        out.append((prompt, messages[answer]["content"]))
    return out


def evaluate(session, items: list) -> dict:
    replies = []
    for prompt, reference in items:
        reply = session.reply_to(prompt)
        replies.append({"reply": reply, "reference": reference,
                        "exact": normalise(reply) == normalise(reference), "f1": word_f1(reply, reference)})
    n = len(replies)
    return {"n": n, "accuracy": sum(r["exact"] for r in replies) / n, "word_f1": sum(r["f1"] for r in replies) / n,
            "replies": replies}


def load_target(target: str, seed: int = 0):
    """``(model, tokenizer, template, system)``: an untrained model from a config, or a converted folder."""
    if Path(target).is_dir():
        from ..chat.loading import load_chat_model
        loaded = load_chat_model(target, device="cpu")
        return loaded.model, loaded.tokenizer, loaded.template, loaded.system
    from mmengine.registry import MODELS

    from ..builder import build
    from ..config import load_config
    from ..model.export import chat_settings
    cfg = load_config(target)
    torch.manual_seed(seed)  # the projector's initialisation
    model = MODELS.build(cfg.model).eval()
    settings = chat_settings(cfg)
    return model, build(cfg.tokenizer), settings["template"], settings["system"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.multimodal.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a multimodal config (untrained) or a converted folder (trained)")
    parser.add_argument("--data", default="emoji-small_names_test_seen", help="source of questions with pictures")
    parser.add_argument("--limit", type=int, help="the first N questions only")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", help="write every reply to this jsonl file")
    args = parser.parse_args(argv)
    from ..chat.session import ChatSession
    from ..errors import UserError
    try:
        model, tokenizer, template, system = load_target(args.target)
        items = questions(args.data)[:args.limit]
    except UserError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, template, system, max_new_tokens=args.max_new_tokens)
    result = evaluate(session, items)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            for row in result["replies"]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    for row in result["replies"][:5]:
        print(f"  {row['reference']!r:40} -> {row['reply']!r}")
    right = sum(r["exact"] for r in result["replies"])
    print(f"{args.target} on {args.data}: accuracy {result['accuracy']:.1%} ({right}/{result['n']}), "
          f"word F1 {result['word_f1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
