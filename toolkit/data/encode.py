"""Conversation -> input_ids + labels. The one place where label masking happens.

Only what the assistant says is trained: its reply, the template's SUFFIX and, where the SUFFIX is not
the end-of-sequence marker, the EOS token. System prompt, user turns, SEP and the assistant's header
(the end of INSTRUCTION) get the label ``IGNORE_INDEX``. An assistant message with ``"loss": False``
is kept as context but not trained.

``conversation_pieces`` turns a conversation into ``(text, trained)`` pieces (pure, no tokenizer); every
piece is tokenized on its own.
Multimodal text marks each picture with ``IMAGE``; with ``image_tokens=(id, n)`` every mark becomes ``n``
placeholder ids (never trained), which the model replaces by the picture's projected features. ``encode_conversation`` does that for one conversation,
``encode_conversations`` for many at once: the pieces of a whole batch go to the Rust tokenizer in one
call (it runs them in parallel), and pieces past ``max_length`` are never tokenized. Both assemble the
same pieces the same way, so their ids and labels are identical (tests/data check it on real data).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .formats.common import FormatError
from .templates import is_auto

IGNORE_INDEX = -100
EOS = None  # the piece that stands for the tokenizer's EOS token
IMAGE = "\ue000"  # marks a picture's place in message text (toolkit/multimodal puts it there)
IMAGE_PIECE = ("image",)  # the piece that stands for one picture's placeholder tokens
_CHARS_PER_TOKEN = 4  # a guess that only decides how many pieces a round tokenizes, never the result


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by itself (llama does; SmolLM2 and Qwen do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def conversation_pieces(messages: list, template: dict, system: str | None = None) -> list:
    """``[(text or EOS, trained), ...]`` for one conversation rendered with a named template.

    ``system`` is used when the conversation has no system message of its own.
    """
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    system_format = template.get("SYSTEM", "")
    pending = system_format.format(system=system) if system else ""
    in_input = template.get("SYSTEM_IN_INPUT", False)
    instruction, suffix, sep = template["INSTRUCTION"], template.get("SUFFIX", ""), template.get("SEP", "")
    pieces = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":  # a later system message: put it before the next user turn
            pending += system_format.format(system=content)
        elif role == "user":
            text = instruction.format(input=pending + content) if in_input \
                else pending + instruction.format(input=content)
            pieces.append((text, False))
            pending = ""
        else:  # assistant
            if pending:
                pieces.append((pending, False))
                pending = ""
            trained = message.get("loss") is not False
            pieces.append((content + suffix, trained))
            if not template.get("SUFFIX_AS_EOS", False):
                pieces.append((EOS, trained))
            pieces.append((sep, False))
    return [(text, trained) for text, trained in pieces if text != ""]


def split_image_pieces(plan: list) -> list:
    """Pieces with every ``IMAGE`` mark cut out as an untrained ``IMAGE_PIECE`` of its own."""
    out = []
    for text, trained in plan:
        if text is EOS or IMAGE not in text:
            out.append((text, trained))
            continue
        for k, part in enumerate(text.split(IMAGE)):
            if k:
                out.append((IMAGE_PIECE, False))
            if part:
                out.append((part, trained))
    return out


def encode_conversation(messages: list, tokenizer, template: dict, max_length: int,
                        system: str | None = None, image_tokens: tuple | None = None) -> dict:
    """Encode one unified conversation.

    Returns ``{"input_ids": [...], "labels": [...], "num_trained": n}``, truncated to ``max_length``;
    ``num_trained`` is 0 when truncation (or ``loss: False`` everywhere) left nothing to learn.
    """
    encoded = encode_conversations([messages], tokenizer, template, max_length, system=system, progress=False,
                                   image_tokens=image_tokens)
    return encoded.sample(0)


@dataclass
class Encoded:
    """Many encoded samples in flat arrays: sample ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray          # int32
    labels: np.ndarray       # int32, IGNORE_INDEX where not trained
    offsets: np.ndarray      # int64, len n + 1
    num_trained: np.ndarray  # int64, trained tokens per sample (within the kept length)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> dict:
        start, end = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.ids[start:end].tolist(), "labels": self.labels[start:end].tolist(),
                "num_trained": int(self.num_trained[i])}


def encode_conversations(conversations: list, tokenizer, template: dict, max_length: int,
                         system: str | None = None, progress: bool = True,
                         image_tokens: tuple | None = None) -> Encoded:
    """Encode many conversations, each truncated to ``max_length`` tokens (exactly as one at a time).

    Pieces are tokenized in rounds: each round takes, per unfinished conversation, the next pieces up to
    a character budget for the tokens it still has room for, and tokenizes them all in one call.
    """
    if is_auto(template):
        if image_tokens:
            from ..errors import UserError
            raise UserError("conversations with pictures need a named template, not template='auto'")
        return _encode_with_chat_template(conversations, tokenizer, max_length, system)
    plans = [conversation_pieces(messages, template, system) for messages in conversations]
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    fixed = {EOS: [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]}
    if image_tokens:
        plans = [split_image_pieces(plan) for plan in plans]
        fixed[IMAGE_PIECE] = [image_tokens[0]] * image_tokens[1]
    tokens = [[None] * len(plan) for plan in plans]
    count = [len(bos)] * len(plans)
    done = [0] * len(plans)  # pieces tokenized so far, per conversation
    active = [c for c in range(len(plans)) if plans[c] and count[c] < max_length]
    with _large_word_cache(tokenizer, enabled=len(plans) > 1):
        _tokenize_in_rounds(plans, tokens, count, done, active, tokenizer, fixed, max_length, progress)
    flat_ids, flat_labels, offsets = [], [], [0]
    for c, plan in enumerate(plans):
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for i in range(done[c]):
            piece = tokens[c][i]
            ids += piece
            labels += piece if plan[i][1] else [IGNORE_INDEX] * len(piece)
        flat_ids += ids[:max_length]
        flat_labels += labels[:max_length]
        offsets.append(len(flat_ids))
    return _pack_arrays(flat_ids, flat_labels, offsets)


def _tokenize_in_rounds(plans, tokens, count, done, active, tokenizer, fixed, max_length, progress) -> None:
    """Fill ``tokens[c][i]`` for the pieces of each conversation that fit in ``max_length`` (see above);
    ``fixed`` gives the ids of the pieces that are not text (EOS, pictures)."""
    while active:
        ends, texts = {}, {}
        for c in active:
            plan, i, budget = plans[c], done[c], (max_length - count[c]) * _CHARS_PER_TOKEN
            while i < len(plan) and budget > 0:
                text = plan[i][0]
                budget -= _CHARS_PER_TOKEN * max(1, len(fixed[text])) if text in fixed else len(text)
                if text not in fixed:
                    texts.setdefault(text, len(texts))
                i += 1
            ends[c] = i
        ids_of = tokenize_texts(tokenizer, list(texts), progress=progress and len(texts) > 1000)
        still = []
        for c in active:
            for i in range(done[c], ends[c]):
                text = plans[c][i][0]
                tokens[c][i] = fixed[text] if text in fixed else ids_of[texts[text]]
                count[c] += len(tokens[c][i])
            done[c] = ends[c]
            if done[c] < len(plans[c]) and count[c] < max_length:
                still.append(c)
        active = still


def _pack_arrays(flat_ids: list, flat_labels: list, offsets: list) -> Encoded:
    ids = np.array(flat_ids, dtype=np.int32)
    labels = np.array(flat_labels, dtype=np.int32)
    offsets = np.array(offsets, dtype=np.int64)
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX, dtype=np.int64)])
    return Encoded(ids, labels, offsets, trained[offsets[1:]] - trained[offsets[:-1]])


@contextlib.contextmanager
def _large_word_cache(tokenizer, enabled: bool, size: int = 1_000_000):
    """A bigger BPE word cache while a corpus is tokenized (the default holds 10,000 words and stops
    caching when full; measured ~20% faster on ShareGPT). The cache only memoizes, results are the same."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not enabled or not hasattr(model, "_resize_cache"):
        yield
        return
    model._resize_cache(size)
    try:
        yield
    finally:
        model._resize_cache(10_000)  # tokenizers' default capacity; frees the memory


def tokenize_texts(tokenizer, texts: list, progress: bool = False, chunk: int = 4096) -> list:
    """Token ids of each text (no special tokens added), the same as ``tokenizer(text)`` one by one.

    A fast tokenizer's Rust backend gets whole chunks at once (``encode_batch_fast``: no offsets).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    usable = (backend is not None and backend.truncation is None and backend.padding is None
              and getattr(backend, "encode_special_tokens", False) == bool(getattr(tokenizer, "split_special_tokens", False)))
    if usable:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        run = lambda part: [e.ids for e in encode(part, add_special_tokens=False)]  # noqa: E731
    else:
        run = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"]  # noqa: E731
    starts = range(0, len(texts), chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="tokenize", unit="chunk", mininterval=1.0)
    out = []
    for start in starts:
        out += run(texts[start:start + chunk])
    return out


def _chat_spans(messages: list, tokenizer) -> tuple[str, list]:
    """The conversation rendered by the tokenizer's chat template, and the character spans to train.

    A reply's span runs from the end of the generation prompt before it to the end of its own render,
    less trailing whitespace (so ``Hello!<|im_end|>`` is trained and the newline after it is not).
    """
    def render(part, prompt=False):
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)
        except Exception as exc:  # a Jinja template may raise anything (e.g. "roles must alternate")
            raise FormatError(f"the tokenizer's chat template cannot render it: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    full, spans = render(clean), []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, upto = render(clean[:k], prompt=True) if k else "", render(clean[:k + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            raise FormatError("the tokenizer's chat template does not render this conversation turn by turn "
                              "(an earlier part changes when a message is added); use a named template")
        if message.get("loss") is not False:
            spans.append((len(head), len(head) + len(upto[len(head):].rstrip())))
    return full, spans


def _encode_with_chat_template(conversations, tokenizer, max_length, system) -> Encoded:
    """``template='auto'``: ids are exactly ``apply_chat_template``'s; labels on the assistant spans."""
    if not getattr(tokenizer, "chat_template", None):
        from ..errors import UserError
        raise UserError("template='auto' needs a tokenizer with a chat template (tokenizer.chat_template "
                        "is empty); choose a named template")
    texts, all_spans = [], []
    for messages in conversations:
        if system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system}] + list(messages)
        text, spans = _chat_spans(messages, tokenizer)
        texts.append(text)
        all_spans.append(spans)
    flat_ids, flat_labels, offsets = [], [], [0]
    for start in range(0, len(texts), 1024):
        batch = tokenizer(texts[start:start + 1024], add_special_tokens=False, return_offsets_mapping=True)
        for ids, token_offsets, spans in zip(batch["input_ids"], batch["offset_mapping"],
                                             all_spans[start:start + 1024]):
            ids = ids[:max_length]
            flat_ids += ids
            flat_labels += [tid if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                            for tid, (s, _) in zip(ids, token_offsets)]
            offsets.append(len(flat_ids))
    return _pack_arrays(flat_ids, flat_labels, offsets)


def prompt_for_generation(messages: list, tokenizer, template: dict, system: str | None = None,
                          image_tokens: tuple | None = None) -> list:
    """Token ids of a conversation that ends with the user's turn: exactly the prompt the model saw in
    training before a reply (the INSTRUCTION ends where the assistant starts)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user message")
    if is_auto(template):
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + list(messages)
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        out = tokenizer.apply_chat_template(clean, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return encode_conversation(messages, tokenizer, template, max_length=10**9, system=system,
                               image_tokens=image_tokens)["input_ids"]
