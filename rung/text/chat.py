"""Chat templates: the model's own Jinja template, rendered the way transformers renders it.

Templates come from model files, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment, where attribute access to internals (`__class__`, `__globals__`, ...)
and mutation of the inputs raise an error instead of executing (rung raises at the access itself,
where jinja would hand back an empty Undefined). The environment and helpers mirror transformers'
`_cached_compile_jinja_template` (utils/chat_template_utils.py): trim_blocks and lstrip_blocks, the
loopcontrols extension, the `generation` tag, `raise_exception`, a `tojson` that does not
HTML-escape, `strftime_now`, a `namespace` that refuses underscore attributes, `dict`, and the
special tokens as variables.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.utils

from rung.text.sandbox import BoundedSandbox, render_bounded
from rung.text.templates import (CHATML_TEMPLATE, GEMMA3_TEMPLATE, MISTRAL_TEMPLATE, OLMO2_TEMPLATE, PHI3_TEMPLATE,
                                 QWEN3_TEMPLATE)

# model_type (config.json) or general.architecture (GGUF) → a template for files that ship none
FALLBACK_TEMPLATES = {
    "gemma3": GEMMA3_TEMPLATE, "gemma3_text": GEMMA3_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE, "qwen3_moe": QWEN3_TEMPLATE, "qwen3moe": QWEN3_TEMPLATE,
    # issue 21 (families); model types and GGUF architecture names
    "mistral": MISTRAL_TEMPLATE, "mixtral": MISTRAL_TEMPLATE, "phi3": PHI3_TEMPLATE, "olmo2": OLMO2_TEMPLATE,
    "gemma2": GEMMA3_TEMPLATE,
}
HARMONY_MODEL_TYPES = ("gpt_oss", "gpt-oss")

# Names a message's reasoning arrives under (transformers' _REASONING_FIELDS); templates read the first
# (Qwen3) or `thinking` (gpt-oss), so every present one is copied to both.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A template that does not parse, raises, or tries something the sandbox forbids."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson, which would HTML-escape `<`, `>`, `&` and `'`
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore-prefixed attributes (a route to CPython internals)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks in transformers;
    rendering only needs its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment(now: Callable[[], datetime]) -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.wrap_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _environment(datetime.now).from_string(source)


def _plain(value: Any) -> Any:
    """Inputs rebuilt from plain JSON types, so a template only ever sees dicts, lists and scalars
    (transformers' _plain_template_data; rich objects carry methods the sandbox cannot vet)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return _plain(value.item())  # a numpy scalar (np.bool_(False) must not become a truthy string)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"  # anything else becomes an inert placeholder naming its type


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A model's Jinja chat template. `render(messages, ...)` equals transformers'
    `apply_chat_template(messages, tokenize=False, ...)` for the same template and special tokens.

    Compiling is quick whatever the template (nothing is evaluated while compiling), so a template
    that does not parse is refused at load; one that misbehaves is refused when it renders (it may do
    so only for some messages), within rung.text.sandbox's time and size bounds. Either way the error
    is one ChatTemplateError line naming the model (`name`)."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, now: Callable[[], datetime] | None = None,
                 name: str | None = None):
        self.name = name
        if not isinstance(source, str) or not source:
            raise ChatTemplateError(f"{self._what}: must be a non-empty string")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if bos_token is not None:
            self.special_tokens["bos_token"] = bos_token
        if eos_token is not None:
            self.special_tokens["eos_token"] = eos_token
        try:
            self._template = _compile(source) if now is None else _environment(now).from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self._what} does not parse (line {e.lineno}): {e.message}") from None
        except RecursionError:
            raise ChatTemplateError(f"{self._what} does not parse: nested too deeply") from None
        except Exception as e:  # noqa: BLE001 -- any other failure of jinja's compiler on hostile source
            raise ChatTemplateError(f"{self._what} does not compile: {_one_line(e)}") from None

    @property
    def _what(self) -> str:
        return f"chat template of {self.name}" if self.name else "chat template"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **kwargs) -> str:
        """`kwargs` reach the template as variables: `enable_thinking` (Qwen3), `reasoning_effort`
        (gpt-oss), or anything else a template reads. They override the special tokens."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("messages must be a list of dicts with 'role' and 'content'")
        # as apply_chat_template: keys set to None (OpenAI's `content: null` beside tool calls) are
        # dropped, so templates see them as undefined rather than rendering "None"
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in _plain(list(messages))]
        variables = {**self.special_tokens, **_plain(kwargs), "messages": chat, "tools": _plain(tools),
                     "documents": _plain(documents), "add_generation_prompt": add_generation_prompt}
        try:
            return render_bounded(self._template, variables)
        except jinja2.exceptions.SecurityError as e:  # the sandbox's and rung's bounds
            raise ChatTemplateError(f"{self._what} refused: {_one_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...) and undefined errors
            raise ChatTemplateError(f"{self._what} failed: {_one_line(e)}") from None
        except RecursionError:
            raise ChatTemplateError(f"{self._what} refused: it recurses too deeply") from None
        except Exception as e:  # noqa: BLE001 -- a template's own bug: a bad filter argument, 1/0, ...
            raise ChatTemplateError(f"{self._what} failed: {type(e).__name__}: {_one_line(e)}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars)"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."


def encode_chat(tokenizer, template, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None, **kwargs) -> tuple[str, list[int]]:
    """The one place a chat becomes token ids (LLM.chat, Tokenizer.encode_chat and `rung serve` all
    come here): `template` (a ChatTemplate or HarmonyTemplate) renders the chat, and special tokens
    come only from the template: one a user writes in a message, a tool result or a template variable
    is encoded as text (rung.text.user_text). The template writes BOS itself where the model wants it,
    so none is added on top (as transformers' `apply_chat_template(tokenize=True)`).

    Returns the rendered text and its ids."""
    guard = tokenizer.special_token_guard
    try:
        inputs = _plain({"messages": list(messages) if isinstance(messages, (list, tuple)) else messages,
                         "tools": tools, "kwargs": kwargs})
    except RecursionError:
        raise ChatTemplateError("messages are nested too deeply") from None
    if not isinstance(inputs["messages"], list) or not all(isinstance(m, dict) for m in inputs["messages"]):
        raise ChatTemplateError("messages must be a list of dicts with 'role' and 'content'")
    names = list(inputs["kwargs"])  # variable names are the caller's, not text: only values are marked
    data = (inputs["messages"], inputs["tools"], list(inputs["kwargs"].values()))
    (chat, tools, values), sentinels = guard.mark(data, also_avoid=getattr(template, "source", None) or "")
    text = template.render(chat, add_generation_prompt=add_generation_prompt, tools=tools, **dict(zip(names, values)))
    return guard.encode(text, sentinels)


def chat_template_for(tokenizer_or_model_type) -> "ChatTemplate":
    """The template to render a model's chats with.

    - gpt-oss (by model type, or a vocabulary with harmony's `<|channel|>`): rung's harmony renderer;
    - a tokenizer carrying its model's template: that template, with its special tokens;
    - otherwise a known template for the model type (Gemma 3, Qwen3), else ChatML.
    """
    from rung.text.harmony import HarmonyTemplate

    if isinstance(tokenizer_or_model_type, str) or tokenizer_or_model_type is None:
        model_type, tokenizer = tokenizer_or_model_type, None
    else:
        tokenizer = tokenizer_or_model_type
        model_type = getattr(tokenizer, "model_type", None)
    if model_type in HARMONY_MODEL_TYPES or (tokenizer is not None and tokenizer.token_to_id("<|channel|>") is not None
                                              and tokenizer.token_to_id("<|start|>") is not None):
        return HarmonyTemplate()
    specials = tokenizer.special_tokens_map if tokenizer is not None else {}
    if tokenizer is not None and tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, special_tokens=specials, name=tokenizer.source or None)
    return ChatTemplate(FALLBACK_TEMPLATES.get(model_type, CHATML_TEMPLATE), special_tokens=specials)
