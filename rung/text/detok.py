"""Incremental detokenization for streaming: text out as tokens come in, never half a character.

Decoding one token at a time is wrong twice over: a character can span several tokens (byte-level
BPE pieces of an emoji, SentencePiece byte-fallback tokens like <0xF0>), and a decoder can treat a
token differently by position (SentencePiece strips the leading space of the first token). So we
decode a short window of ids twice, with and without the newest ids, and emit the difference, and
only once it no longer ends in U+FFFD (bytes of an unfinished character). The window starts where
the previous emission ended, always on a character boundary, so the deltas concatenate to exactly
`tokenizer.decode(all_ids)`. Same scheme as vLLM's and text-generation-inference's detokenizers.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window: ids before it are emitted and out of reach
        self._read = 0    # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # nothing new yet, or an unfinished character at the end
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of generation decodes as
        U+FFFD here, as it does in `tokenizer.decode`)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if after.startswith(before) else after
