"""Streaming helpers: cut the streamed text at stop words, and turn ``generate`` into an iterator."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, TextStreamer


class StopWordFilter:
    """Feeds streamed text through and stops at the first stop word.

    A tail that could be the start of a stop word is held back until the next piece tells; leading
    whitespace is dropped (the final reply is stripped too, so the stream and the reply agree).

    >>> f = StopWordFilter(["<eoa>"])
    >>> f.push("Hi <e"), f.push("oa> more"), f.flush(), f.stopped
    ('Hi ', '', '', True)
    """

    def __init__(self, stop_words):
        self.words = [w for w in stop_words if w]
        self.buffer, self.started, self.stopped = "", False, False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        if not self.started:
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
        hits = [self.buffer.find(w) for w in self.words if w in self.buffer]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        hold = max((k for w in self.words for k in range(1, len(w)) if self.buffer.endswith(w[:k])), default=0)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class CallbackStreamer(TextStreamer):
    """Hands each finished piece of decoded text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self._on_text(text)


class StopEvent(StoppingCriteria):
    """Ends generation once ``event`` is set (a stop word was streamed, or the reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def merge_streams(works, cancel: threading.Event | None = None) -> Iterator[tuple]:
    """Runs each ``work(on_text, cancel)`` in its own thread and yields ``(index, text)`` as they come.

    Closing the iterator early, or setting ``cancel`` from elsewhere (a client that went away), ends the
    works; closing waits for their threads. The first exception a work raised is raised here at the end.
    """
    pieces: queue.Queue = queue.Queue()
    cancel = cancel or threading.Event()
    failure: list = []

    def target(index, work):
        try:
            work(lambda text: pieces.put((index, text)), cancel)
        except BaseException as exc:  # handed to the reader below
            failure.append(exc)
        finally:
            pieces.put((index, None))

    threads = [threading.Thread(target=target, args=(i, work), daemon=True) for i, work in enumerate(works)]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            index, piece = pieces.get()
            if piece is None:
                running -= 1
            else:
                yield index, piece
    finally:
        cancel.set()
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]


def iterate_in_thread(work: Callable[[Callable[[str], None], threading.Event], object],
                      cancel: threading.Event | None = None) -> Iterator[str]:
    """``merge_streams`` for one work: the text it hands to ``on_text``, as it comes."""
    for _, piece in merge_streams([work], cancel):
        yield piece
