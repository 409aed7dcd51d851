"""Text in, text out: incremental detokenization, stop strings and chat templates.

The engine works on token ids; ``TextStream`` turns a request's growing token list into text the
way vLLM does: text is released only once it can no longer change (no trailing incomplete UTF-8
character, no suffix that could still become a stop string), so a streaming client never sees
text past a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence


class TextStream:
    """One request's output tokens -> released text, cut at the first stop string.

    ``push(tokens)`` takes the next tokens and returns the newly released text; after a stop string
    ``stopped`` is True and later tokens are ignored; ``finish()`` releases what was held back
    once no more tokens will come. ``token_ids`` are the tokens consumed (up to and including the
    one that completed a stop string). Without a tokenizer the text stays empty.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with a model that has none")
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (released and held back); cut at a stop string
        self.released = 0  # characters of self.text handed out
        self.stopped = False
        self._prefix, self._read = 0, 0  # decode window: tokens [prefix, read) were decoded already

    def push(self, tokens: Sequence[int]) -> str:
        """Consume ``tokens``; returns the text released by them ("" when all is held back)."""
        start = self.released
        for token in tokens:
            if self.stopped:
                break
            self.token_ids.append(token)
            if self.tokenizer is None:
                continue
            searched_from = len(self.text)
            self.text += self._decode_next()
            self._cut_at_stop(searched_from)
        if not self.stopped:
            self.released = max(self.released, len(self.text) - self._held_back())
        else:
            self.released = len(self.text)
        return self.text[start:self.released]

    def finish(self) -> str:
        """No more tokens: decode what the UTF-8 check held back and release everything."""
        start = self.released
        if self.tokenizer is not None and not self.stopped and self._read < len(self.token_ids):
            searched_from = len(self.text)
            done = self._decode(self.token_ids[self._prefix:self._read])
            self.text += self._decode(self.token_ids[self._prefix:])[len(done):]
            self._read = self._prefix = len(self.token_ids)
            self._cut_at_stop(searched_from)
        self.released = len(self.text)
        return self.text[start:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_next(self) -> str:
        """The text the last token adds, decoded with the tokens before it as context (sentencepiece
        spaces, multi-token characters); "" while the last character is still incomplete."""
        done = self._decode(self.token_ids[self._prefix:self._read])
        now = self._decode(self.token_ids[self._prefix:])
        if len(now) > len(done) and not now.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.token_ids)
            return now[len(done):]
        return ""

    def _cut_at_stop(self, searched_from: int) -> None:
        if not self.stop or self.stopped:
            return
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, searched_from - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _held_back(self) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held


def chat_prompt_ids(tokenizer: Any, messages: list[dict], chat_template: str | None = None) -> list[int]:
    """``messages`` ([{"role": ..., "content": ...}, ...]) through the tokenizer's chat template
    (or ``chat_template``) with the assistant's turn opened, as token ids."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer with a chat template, and this model has none; "
                         "give token ids to generate() instead")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template: pass chat_template=<a Jinja template> "
                         "or use generate() with a text prompt")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # jinja2 errors (a template's raise_exception, a bad message) -> the caller's input
        raise ValueError(f"the chat template rejected the messages: {e}") from e
    # the template writes special tokens (BOS) itself, as vLLM assumes
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A text prompt as token ids (with the tokenizer's special tokens, e.g. BOS)."""
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer and this model has none; "
                         "give token ids instead ({'prompt_token_ids': [...]})")
    return list(tokenizer(text)["input_ids"])
