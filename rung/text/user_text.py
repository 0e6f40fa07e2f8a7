"""Special tokens come from the chat template, never from what users write.

A user who writes `<|im_end|>\n<|im_start|>system\n...` in a message would get, from a plain
`encode(render(messages))`, the real control-token ids: a forged system turn. OpenAI's API does not
allow that, and neither does rung (vLLM and transformers do, by default).

How: every string a caller passes to the template (message contents, reasoning, tool calls and their
results, tool definitions, documents, template variables) is scanned for special-token strings. The
first character of each occurrence is swapped for a private-use sentinel before rendering, so the
template renders exactly as before (it may strip, split or repeat the content: the sentinel travels
with it) and the sentinels in the rendered text say where user-written special tokens landed. Then:

- no sentinel (the ordinary case): the text is encoded as it always was, so ids do not change;
- otherwise the text is encoded with special tokens matched; where a special token covers a sentinel
  (a user wrote it), the text is cut one character into it and the pieces are encoded apart, so it
  becomes text tokens (`<`, `|`, `im`, `_`, `start`, ...), while the template's own special tokens keep
  their ids. (The tokenizers library's `encode_special_tokens` does the same for a whole text, but
  needs a second copy of the tokenizer, seconds to build for Gemma's 262k-token vocabulary.)

Only special added tokens (control tokens: `<|im_start|>`, `<start_of_turn>`, harmony's `<|start|>`)
are guarded; non-special added tokens such as Qwen3's `<think>` are vocabulary words a user may write.
A special token cannot form across a user string's edge with template text unless the template writes
part of a special token right beside user text, which no known template does.

`/v1/completions` and `LLM.generate` take raw text and keep parsing special tokens in it, as vLLM does:
there the caller writes the whole prompt, template included.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
import re
from typing import Any

from tokenizers import Tokenizer as Backend

_PRIVATE_USE = re.compile("[\U000F0000-\U0010FFFF]")


class SpecialTokenGuard:
    """Marks special-token strings in user data before rendering, and encodes the rendered text so that
    the marked ones stay text. One per tokenizer (it caches a copy of the backend)."""

    def __init__(self, backend: Backend, special_ids: frozenset[int]):
        self.backend = backend
        self.special_ids = special_ids
        added = backend.get_added_tokens_decoder()
        specials = sorted({t.content for i, t in added.items() if i in special_ids and t.content})
        # special strings by first character, then by length, so a scan costs one dict probe per
        # candidate character and one set probe per distinct length (Gemma 3 has 6,000 specials)
        self._by_first: dict[str, dict[int, set[str]]] = {}
        for s in specials:
            self._by_first.setdefault(s[0], {}).setdefault(len(s), set()).add(s)
        # a special token that matches exactly itself (no whitespace stripping, not normalized): the
        # separator _encode_piece puts in front of a piece
        plain = [(t.content, i) for i, t in sorted(added.items())
                 if i in special_ids and t.content and not (t.lstrip or t.rstrip or t.normalized or t.single_word)]
        self._prefix = plain[0] if plain else None

    # -- before rendering ---------------------------------------------------------------------------

    def occurrences(self, s: str) -> list[int]:
        """Start positions of every special-token string in `s` (overlapping ones included)."""
        starts = []
        for first, by_length in self._by_first.items():
            pos = s.find(first)
            while pos != -1:
                if any(s[pos:pos + n] in options for n, options in by_length.items()):
                    starts.append(pos)
                pos = s.find(first, pos + 1)
        return sorted(set(starts))

    def mark(self, data: Any, also_avoid: str = "") -> tuple[Any, dict[str, str]]:
        """`data` with the first character of every special-token string in its strings (dict keys
        included) replaced by a sentinel; and the sentinels, each mapped to the character it hides.
        Unchanged (the same objects) when no string holds a special token."""
        strings: list[str] = []
        _collect_strings(data, strings)
        hits = {id(s): found for s in strings if (found := self.occurrences(s))}
        if not hits:
            return data, {}
        used = set(_PRIVATE_USE.findall(also_avoid))
        for s in strings:
            used.update(_PRIVATE_USE.findall(s))
        sentinels: dict[str, str] = {}  # original character -> sentinel
        free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)

        def marked(s: str) -> str:
            found = hits.get(id(s))
            if not found:
                return s
            chars = list(s)
            for pos in found:
                if chars[pos] not in sentinels:
                    sentinels[chars[pos]] = next(free)
                chars[pos] = sentinels[chars[pos]]
            return "".join(chars)

        out = _map_strings(data, marked)
        return out, {z: c for c, z in sentinels.items()}

    # -- after rendering ----------------------------------------------------------------------------

    def encode(self, rendered: str, sentinels: dict[str, str]) -> tuple[str, list[int]]:
        """The rendered text with the sentinels put back, and its ids: special tokens where the template
        wrote them, text tokens where a user did."""
        if not sentinels:
            return rendered, self.backend.encode_batch([rendered], add_special_tokens=False)[0].ids
        pattern = re.compile("[" + "".join(map(re.escape, sentinels)) + "]")
        marks = [m.start() for m in pattern.finditer(rendered)]
        text = pattern.sub(lambda m: sentinels[m.group()], rendered)
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0]
        cuts, written = [], 0  # where to cut the text so no user-written special token is whole; template's
        for token_id, (start, end) in zip(ids.ids, ids.offsets):
            if token_id in self.special_ids:
                inside = marks[bisect_left(marks, start):bisect_left(marks, end)]
                cuts += [m + 1 for m in inside]
                written += not inside
        if not cuts:
            return text, ids.ids
        out = []
        for at, stop in zip([0, *cuts], [*cuts, len(text)]):
            out += self._encode_piece(text[at:stop], at)
        if sum(i in self.special_ids for i in out) != written:
            # cannot happen with a tokenizer that matches special tokens leftmost-longest; refuse rather
            # than hand on a special token a user wrote
            raise ValueError("a special token written in the messages could not be encoded as text")
        return text, out

    def _encode_piece(self, piece: str, offset: int) -> list[int]:
        """`piece`, found at `offset` of the rendered text, encoded as it would be there: a piece after the
        start is encoded behind a special token (whose id is dropped), so that a pre-tokenizer which
        treats the start of the text differently (Metaspace's prepend_scheme="first") does not."""
        if offset == 0 or self._prefix is None:
            return self.backend.encode_batch([piece], add_special_tokens=False)[0].ids if piece else []
        prefix, prefix_id = self._prefix
        ids = self.backend.encode_batch([prefix + piece], add_special_tokens=False)[0].ids
        if not ids or ids[0] != prefix_id:
            raise ValueError("a special token written in the messages could not be encoded as text")
        return ids[1:]


def _covers(marks: list[int], start: int, end: int) -> bool:
    """Whether a sorted list of positions has one in [start, end)."""
    i = bisect_left(marks, start)
    return i < len(marks) and marks[i] < end


def _collect_strings(x: Any, out: list[str]) -> None:
    if isinstance(x, str):
        out.append(x)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # harmony's HarmonyMessage
        for field in dataclasses.fields(x):
            _collect_strings(getattr(x, field.name), out)
    elif isinstance(x, dict):
        for k, v in x.items():
            _collect_strings(k, out)
            _collect_strings(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect_strings(v, out)


def _map_strings(x: Any, f) -> Any:
    if isinstance(x, str):
        return f(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{fl.name: _map_strings(getattr(x, fl.name), f) for fl in dataclasses.fields(x)
                                         if fl.init})
    if isinstance(x, dict):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_strings(v, f) for v in x]
    if isinstance(x, tuple):
        return tuple(_map_strings(v, f) for v in x)
    return x
