"""Incremental detokenization and stop-string matching for one request.

Decoding token by token breaks multi-byte characters and merged spaces, so each step decodes a short
window: text(ids[prefix:]) minus text(ids[prefix:read]) is the new text, emitted only once it no
longer ends in an incomplete character (U+FFFD). Stop strings are matched on the accumulated text,
across token boundaries; the last len(longest stop) - 1 characters are held back from streaming so
a stop string is never sent in part.
"""
from __future__ import annotations

_INITIAL_WINDOW = 5  # prompt tokens decoded as context for the first output token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-_INITIAL_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.num_emitted_chars = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; returns the stop string matched (text then ends before it, or after it if
        include_stop_str_in_output), else None."""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.token_ids[self.prefix_offset:])
            if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
                delta = full_text[len(prefix_text):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                matched = self._append_and_match(delta)
                if matched is not None:
                    return matched
        return None

    def _append_and_match(self, delta: str) -> str | None:
        old_len = len(self.text)
        self.text += delta
        # only a match that includes a new character is new; the earliest match wins
        matches = [(idx, stop) for stop in self.stop
                   if (idx := self.text.find(stop, max(0, old_len - len(stop) + 1))) != -1]
        if not matches:
            return None
        idx, stop = min(matches)
        self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
        return stop

    def take_new_text(self, finished: bool) -> str:
        """Text not yet emitted; while unfinished, keeps back a possible stop-string prefix."""
        end = len(self.text) if finished or not self.stop else max(self.num_emitted_chars,
                                                                    len(self.text) - self.holdback)
        new_text = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return new_text
