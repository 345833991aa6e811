"""Incremental detokenization with stop strings.

With a fast (Rust) tokenizer each new token is decoded once, through the `tokenizers`
library's DecodeStream, which holds back incomplete multi-byte characters and keeps the
concatenation equal to decoding all ids at once (skip_special_tokens=True,
clean_up_tokenization_spaces=False): O(1) per token instead of re-decoding the output.
Other tokenizers re-decode the generated ids. New text is emitted as a suffix of what was
emitted before, and when stop strings are set the last (longest stop - 1) characters are
held back until they cannot start a stop string, so streamed text never contains (part
of) a stop string.
"""

from __future__ import annotations

from typing import Any


def _stream_decoder(tokenizer: Any):
    """A DecodeStream over the tokenizer's Rust backend, or None for a slow tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    from tokenizers.decoders import DecodeStream

    return DecodeStream(skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # decoded text of all generated ids
        self.emitted = 0  # characters of self.text already returned
        self._stream = _stream_decoder(tokenizer)
        self._backend = tokenizer.backend_tokenizer if self._stream is not None else None
        self._ids: list[int] = []  # the generated ids pushed so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> tuple[str, bool]:
        """Decode one new generated token; returns (new text, stop string hit). O(1) per token
        with a fast tokenizer (plus the stop-string search over the last few characters)."""
        self._ids.append(token)
        if self._stream is None:
            text = self._decode(self._ids)
        else:
            piece = self._stream.step(self._backend, token)
            text = self.text + piece if piece else self.text
        self.text = text
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.emitted - self.hold)) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text = text[:end]
                new = self.text[self.emitted :]
                self.emitted = len(self.text)
                return new, True
        end = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its next token
            end = min(end, len(text) - 1)
        if end <= self.emitted:
            return "", False
        new = text[self.emitted : end]
        self.emitted = end
        return new, False

    def flush(self) -> str:
        """The held-back rest of the text, at finish (after no stop string was hit)."""
        if self._stream is not None:
            # the stream holds back the bytes of an unfinished character; a full decode once at
            # the end renders them as the replacement character, as decoding all ids does
            full = self._decode(self._ids)
            if full.startswith(self.text):
                self.text = full
        new = self.text[self.emitted :]
        self.emitted = len(self.text)
        return new
