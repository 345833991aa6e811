"""Incremental detokenization with stop strings.

Text is re-decoded from the generated ids (so multi-token characters come out whole),
new text is emitted as a suffix of what was emitted before, and when stop strings are
set the last (longest stop - 1) characters are held back until they cannot start a stop
string, so streamed text never contains (part of) a stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # decoded text of all generated ids
        self.emitted = 0  # characters of self.text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Decode after a new token; returns (new text, stop string hit)."""
        text = self._decode(output_ids)
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
        """The held-back rest of the text, at finish."""
        new = self.text[self.emitted :]
        self.emitted = len(self.text)
        return new
