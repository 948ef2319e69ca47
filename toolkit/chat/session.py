"""A multi-turn chat with a causal LM using the same template and masking rules as training.

One session type serves the terminal (``ask`` with a callback), the web page and the API (``stream`` /
``stream_messages``, iterators of text pieces) and the evaluate-chat hook (``ask`` without streaming).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteriaList

from ..data.encode import prompt_for_generation
from ..data.templates import get_template
from .stream import CallbackStreamer, StopEvent, StopWordFilter, iterate_in_thread


class ChatSession:
    """History + template + generation settings. ``ask`` returns the reply and streams it if asked.

    ``stop_words`` adds to the template's own; ``seed`` reseeds torch before every reply; ``lock`` (shared
    by the sessions of one model in a server) lets one reply be generated at a time.
    After each reply, ``usage`` holds ``prompt_tokens``, ``completion_tokens`` and ``finish_reason``.
    """

    def __init__(self, model, tokenizer, template="chatml", system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, stop_words=(), seed: int | None = None, lock=None):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template)
        self.system = system
        self.extra_stop_words = [w for w in (stop_words or ()) if w]
        self.seed, self.lock = seed, lock
        self.generation = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        if temperature and temperature > 0:
            self.generation.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            self.generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.history: list = []
        self.usage: dict = {}
        # Stop words never change in a session: split once into single tokens (ended on by id) and
        # multi-token strings (ended on by text).
        self._stop_ids, self._stop_strings = self._split_stop_words()

    def reset(self) -> None:
        self.history = []

    def stop_words(self) -> list:
        return list(self.template.get("STOP_WORDS", [])) + self.extra_stop_words

    def _split_stop_words(self) -> tuple[list, list]:
        ids, strings = {self.tokenizer.eos_token_id} - {None}, []
        for word in self.stop_words():
            piece = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(piece) == 1:
                ids.add(piece[0])
            else:
                strings.append(word)
        return sorted(ids), strings

    def prompt_ids(self, messages: list) -> list:
        """The token ids the model is given for a conversation that ends with the user's turn."""
        return prompt_for_generation(messages, self.tokenizer, self.template, system=self.system)

    def prompt_inputs(self, messages: list) -> tuple[list, dict]:
        """``prompt_ids`` and what else ``generate`` needs: a multimodal model gets the pictures that
        ``<img>path</img>`` spans in the messages name."""
        from ..multimodal.chat import image_prompt, is_multimodal
        if is_multimodal(self.model):
            return image_prompt(self.model, messages, self.tokenizer, self.template, self.system)
        return self.prompt_ids(messages), {}

    @torch.no_grad()
    def reply_to(self, messages: list, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> str:
        """The reply to ``messages`` (history is neither read nor changed). ``on_text`` gets it in pieces."""
        prompt, extra = self.prompt_inputs(messages)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt], device=device)
        extra = {key: value.to(device) for key, value in extra.items()}
        cancel = cancel or threading.Event()
        words = StopWordFilter(self.stop_words())

        def forward(text: str) -> None:
            piece = words.push(text)
            if piece:
                on_text(piece)
            if words.stopped:
                cancel.set()

        streamer = CallbackStreamer(self.tokenizer, forward) if on_text else None
        stop_strings = self._stop_strings
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.lock or contextlib.nullcontext():
            was_training = self.model.training
            self.model.eval()
            if self.seed is not None:
                torch.manual_seed(self.seed)
            try:
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    eos_token_id=self._stop_ids, pad_token_id=pad, use_cache=True,
                    stop_strings=stop_strings or None, tokenizer=self.tokenizer if stop_strings else None,
                    stopping_criteria=StoppingCriteriaList([StopEvent(cancel)]), **extra, **self.generation)
            finally:
                self.model.train(was_training)
        if on_text and (tail := words.flush().rstrip()):
            on_text(tail)
        new_ids = output[0, input_ids.shape[1]:].tolist()
        reply = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        for word in self.stop_words():
            reply = reply.split(word)[0]
        hit_limit = bool(new_ids) and len(new_ids) >= self.generation["max_new_tokens"] and new_ids[-1] not in self._stop_ids
        self.usage = dict(prompt_tokens=len(prompt), completion_tokens=len(new_ids),
                          finish_reason="length" if hit_limit and not words.stopped else "stop")
        return reply.strip()

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        messages = self.history + [{"role": "user", "content": text}]
        reply = self.reply_to(messages, on_text)
        self.history = messages + [{"role": "assistant", "content": reply}]
        return reply

    def stream_messages(self, messages: list, cancel: threading.Event | None = None) -> Iterator[str]:
        """Pieces of the reply to ``messages`` as they are generated (a thread runs ``generate``).
        Setting ``cancel`` ends the reply early."""
        return iterate_in_thread(lambda on_text, stop: self.reply_to(messages, on_text, stop), cancel)

    def stream(self, text: str) -> Iterator[str]:
        """Like ``ask``, as an iterator of pieces; the history gets the turn once the reply is complete."""
        messages = self.history + [{"role": "user", "content": text}]
        replies: list = []

        def work(on_text, cancel):
            replies.append(self.reply_to(messages, on_text, cancel))

        yield from iterate_in_thread(work)
        self.history = messages + [{"role": "assistant", "content": replies[0]}]
