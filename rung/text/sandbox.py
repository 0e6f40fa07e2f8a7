"""The Jinja sandbox chat templates run in, with every cost a template controls bounded.

jinja2's sandbox stops a template from reaching Python internals, but not from spending time and
memory: `{{ 10**(10**9) }}` is folded while compiling (loading the model never returns), `'x' * 10**10`
asks for 10 GB, nested `range()` loops render for hours, `{% set s = s ~ s %}` in a loop doubles a
string forty times. Here:

- `**`, `*`, `+` and `%` go through `call_binop` (jinja's `intercepted_binops`), which refuses an
  integer of more than MAX_INT_BITS bits and a string or list of more than MAX_CHARS, before computing
  it. Intercepted operators are never folded at compile time (nodes.BinExpr.as_const), and filters
  are wrapped so that they run only at render time too: compiling any template is quick.
- `~`, joins, str methods, formatting and every `{{ }}` are checked against MAX_CHARS first, counting
  what the value would print as (a list repeating one long string prints it each time).
- `range()` holds at most MAX_RANGE items, and each loop iteration, call and intercepted operator
  checks the render's deadline (RENDER_SECONDS), so no loop, however nested, runs for long.
- The rendered text is at most MAX_CHARS, and all a render builds at most MAX_BUILT (so a loop cannot
  keep many distinct large strings alive).

Every refusal is a TemplateLimitError (a jinja SecurityError); rung.text.chat turns it, like any other
template failure, into one ChatTemplateError line.
"""

from __future__ import annotations

import contextvars
import re
import time
from functools import update_wrapper
from typing import Any, Iterable

import jinja2
import jinja2.exceptions
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, _PassArg

# A real chat renders to about the size of its messages (a 7 MB prompt renders to ~7 MB); a template
# that asks for more than this is building something else.
MAX_CHARS = 16 * 2**20
MAX_INT_BITS = 1 << 16      # integers of ~20,000 digits; a template counts and indexes, it does no bignum maths
MAX_RANGE = 100_000         # jinja's own sandbox limit for one range()
MAX_ITEMS = 1 << 20         # lists batch() and slice() may create
MAX_JSON_INDENT = 64
MAX_BUILT = 16 * MAX_CHARS  # what one render may build in all (strings in characters, lists at 32 per item:
                            # a list of distinct small strings costs ~60 bytes an item)
RENDER_SECONDS = 5.0        # real templates render in milliseconds, even for long chats


class _Render:
    """The render in progress on this thread: its deadline and what it has built so far."""

    def __init__(self):
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.built = 0


# None outside a render (compile-time folding, which the sandbox leaves nothing to do)
_RENDER: contextvars.ContextVar[_Render | None] = contextvars.ContextVar("rung_template_render", default=None)


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A template asked for more time, memory or output than a chat template needs."""


def _tick() -> None:
    render = _RENDER.get()
    if render is not None and time.monotonic() > render.deadline:
        raise TemplateLimitError(f"rendering took longer than {RENDER_SECONDS:g} s")


def _built(value: Any) -> Any:
    """Count a value a template just built against the render's budget: each value is bounded, and so
    is their sum, so a loop cannot keep millions of distinct large strings alive."""
    render = _RENDER.get()
    if render is not None:
        if isinstance(value, str):
            render.built += len(value)
        elif isinstance(value, (list, tuple, dict)):
            render.built += 32 * len(value)
        if render.built > MAX_BUILT:
            raise TemplateLimitError(f"the template built more than {MAX_BUILT} characters in all")
    return value


def render_bounded(template: jinja2.Template, variables: dict) -> str:
    """Render under the deadline and the output bound."""
    token = _RENDER.set(_Render())
    try:
        parts, total = [], 0
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > MAX_CHARS:
                raise TemplateLimitError(f"the rendered text exceeds {MAX_CHARS} characters")
            parts.append(chunk)
        return "".join(parts)
    finally:
        _RENDER.reset(token)


# -- sizes --------------------------------------------------------------------------------------------


def printed_size(value: Any, limit: int = MAX_CHARS) -> int:
    """About how many characters str(value) would take (at least that many); stops counting past `limit`.
    Shared sublists count each time they print, but are walked once, so `[[s]*9]*9` costs 2 steps."""
    seen: dict[int, int] = {}

    def size(x) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, bool) or x is None or isinstance(x, float):
            return 8
        if isinstance(x, int):
            return x.bit_length() // 3 + 2
        if isinstance(x, Namespace):
            x = x._Namespace__attrs  # noqa: SLF001 -- how jinja's Namespace prints itself
        if isinstance(x, dict):
            items: Iterable = (v for kv in x.items() for v in kv)
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = x
        else:
            return 16
        key = id(x)
        if key in seen:
            return seen[key]
        seen[key] = limit + 1  # a container cannot hold itself (the sandbox is immutable); refuse if so
        total = 2
        for item in items:
            total += size(item) + 2
            if total > limit:
                break
        seen[key] = total
        return total

    try:
        return size(value)
    except RecursionError:
        return limit + 1


def _check_printed(value: Any, what: str) -> None:
    if not isinstance(value, str) and printed_size(value) > MAX_CHARS:
        raise TemplateLimitError(f"{what} would print more than {MAX_CHARS} characters")


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise TemplateLimitError(f"{what} holds more than {MAX_CHARS} items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"{what} is an integer of more than {MAX_INT_BITS} bits")
    return _built(value)


def _check_count(n: Any, limit: int, what: str) -> None:
    if isinstance(n, int) and abs(n) > limit:
        raise TemplateLimitError(f"{what} of {n} is above {limit}")


# `%`-formatting widths and precisions, and str.format's: each allocates that many characters
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
_NESTED_SPEC = re.compile(r"\{[^{}]*\{")


def _check_percent_format(fmt: str, args: Any) -> None:
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            if n == "*":
                raise TemplateLimitError("'*' widths in %-formatting are not allowed in chat templates")
            if n and len(n) > 7 or n and int(n) > MAX_CHARS:
                raise TemplateLimitError(f"a %-format width of {n} is above {MAX_CHARS}")
    _check_printed(args, "the %-format's arguments")


def _check_brace_format(fmt: str, args: tuple, kwargs: dict) -> None:
    nested = _NESTED_SPEC.search(fmt) is not None  # '{:{}}': a width may come from an argument
    for n in _DIGITS.findall(fmt):
        if len(n) > 7 or int(n) > MAX_CHARS:
            raise TemplateLimitError(f"a str.format width of {n} is above {MAX_CHARS}")
    for arg in (*args, *kwargs.values()):
        _check_count(arg, MAX_CHARS, "a str.format argument")
        _check_printed(arg, "a str.format argument")
        if nested and isinstance(arg, str) and any(len(n) > 7 or int(n) > MAX_CHARS for n in _DIGITS.findall(arg)):
            raise TemplateLimitError(f"a str.format width above {MAX_CHARS}")


# -- operators ----------------------------------------------------------------------------------------


def _is_sequence(x) -> bool:
    return isinstance(x, (str, list, tuple))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints:
        if right > 0 and abs(left) > 1 and right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
            raise TemplateLimitError(f"{left} ** {right} would be an integer of more than {MAX_INT_BITS} bits")
    elif operator == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"a product of more than {MAX_INT_BITS} bits")
        seq, n = (left, right) if _is_sequence(left) else (right, left)
        if _is_sequence(seq) and isinstance(n, int) and n > 0 and len(seq) * n > MAX_CHARS:
            raise TemplateLimitError(f"repeating a {type(seq).__name__} of length {len(seq)} {n} times "
                                     f"exceeds {MAX_CHARS}")
    elif operator == "+" and _is_sequence(left) and _is_sequence(right):
        if len(left) + len(right) > MAX_CHARS:
            raise TemplateLimitError(f"'+' would build a {type(left).__name__} longer than {MAX_CHARS}")
    elif operator == "%" and isinstance(left, str):
        _check_percent_format(left, right)


# -- calls --------------------------------------------------------------------------------------------

_PADDING_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> None:
    if name in _PADDING_METHODS:
        for arg in (*args, *kwargs.values()):
            _check_count(arg, MAX_CHARS, f"str.{name}'s width")
        if name == "expandtabs" and s.count("\t") * (args[0] if args and isinstance(args[0], int) else 8) > MAX_CHARS:
            raise TemplateLimitError(f"str.expandtabs would exceed {MAX_CHARS} characters")
    elif name == "replace" and len(args) >= 2:
        _check_replace(s, args[0], args[1])
    elif name == "join" and args:
        _check_join(args[0], s)
    elif name in ("format", "format_map"):
        _check_brace_format(s, args, kwargs)


def _check_replace(s: Any, old: Any, new: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        hits = s.count(old) if old else len(s) + 1
        if len(s) + hits * (len(new) - len(old)) > MAX_CHARS:
            raise TemplateLimitError(f"replace would exceed {MAX_CHARS} characters")


def _check_join(items: Any, separator: Any) -> None:
    if isinstance(items, (list, tuple)):
        sep = len(separator) if isinstance(separator, str) else 0
        if printed_size(items) + sep * len(items) > MAX_CHARS:
            raise TemplateLimitError(f"join would exceed {MAX_CHARS} characters")


def bounded_range(*args: int) -> range:
    """range() for templates: at most MAX_RANGE items (jinja's safe_range raises OverflowError)."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitError(f"range() of {len(rng)} items is above {MAX_RANGE}")
    return rng


# -- filters ------------------------------------------------------------------------------------------

# filters that print their input (and arguments) into a new string
_PRINTING_FILTERS = {"string", "tojson", "join", "format", "pprint", "center", "indent", "wordwrap", "truncate",
                     "replace", "trim", "upper", "lower", "title", "capitalize", "striptags", "urlize", "urlencode",
                     "xmlattr", "escape", "e", "forceescape", "safe", "list", "unique", "sort", "sum"}


def _check_filter_args(name: str, args: tuple, kwargs: dict) -> None:
    value, rest = args[0], args[1:]
    if name in _PRINTING_FILTERS:
        _check_printed(value, f"the input of the {name!r} filter")
    if name == "center" and rest:
        _check_count(rest[0], MAX_CHARS, "center's width")
    elif name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        lines = value.count("\n") + 1 if isinstance(value, str) else 1
        if isinstance(width, str):
            width = len(width)
        if isinstance(width, int) and width * lines > MAX_CHARS:
            raise TemplateLimitError(f"indent would exceed {MAX_CHARS} characters")
    elif name == "wordwrap":
        width = rest[0] if rest else kwargs.get("width", 79)
        wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring")
        if isinstance(value, str) and isinstance(width, int) and isinstance(wrap, str):
            if len(value) + (len(value) // max(width, 1) + 1) * len(wrap) > MAX_CHARS:
                raise TemplateLimitError(f"wordwrap would exceed {MAX_CHARS} characters")
    elif name in ("batch", "slice") and rest:
        _check_count(rest[0], MAX_ITEMS, f"{name}'s count")
    elif name == "tojson":
        indent = rest[1] if len(rest) > 1 else kwargs.get("indent")
        if isinstance(indent, str):
            indent = len(indent)
        _check_count(indent, MAX_JSON_INDENT, "tojson's indent")
    elif name == "join":
        _check_join(value, rest[0] if rest else kwargs.get("d", ""))
    elif name == "replace" and len(rest) >= 2:
        _check_replace(value, rest[0], rest[1])
    elif name == "format" and isinstance(value, str):
        _check_percent_format(value, (*rest, *kwargs.values()))


def _runtime_filter(name: str, func):
    """`func` behind the size checks, and marked as needing the render context: jinja calls a plain
    filter with constant arguments while compiling (nodes._FilterTestCommon.as_const), where no bound
    applies; a context filter waits for the render."""
    passes = _PassArg.from_obj(func)

    @jinja2.pass_context
    def bounded(context, *args, **kwargs):
        _tick()
        if args:
            _check_filter_args(name, args, kwargs)
        if passes is _PassArg.context:
            args = (context, *args)
        elif passes is _PassArg.eval_context:
            args = (context.eval_ctx, *args)
        elif passes is _PassArg.environment:
            args = (context.environment, *args)
        return _check_size(func(*args, **kwargs), f"the {name!r} filter's result")

    return update_wrapper(bounded, func, assigned=("__name__", "__doc__"), updated=())


# -- the environment ----------------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Hooks jinja has no setting for: every for loop iterates through environment.bounded_iter
    (checking the deadline each item), slices are counted by environment.bounded_slice, and `~` joins
    through environment.bounded_concat."""

    def visit_For(self, node: nodes.For, frame) -> None:
        if not getattr(node, "_rung_bounded", False):
            node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                                   lineno=node.lineno)
            node._rung_bounded = True
        super().visit_For(node, frame)

    def visit_Getitem(self, node: nodes.Getitem, frame) -> None:
        if isinstance(node.arg, nodes.Slice):  # jinja slices directly, bypassing environment.getitem
            self.write("environment.bounded_slice(")
            super().visit_Getitem(node, frame)
            self.write(")")
        else:
            super().visit_Getitem(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox with time, size and output bounds (see the module docstring).

    jinja's sandbox also turns an unsafe attribute into an Undefined that renders as "" (and only fails
    when used further); here the access itself fails, so a probing template stops at once."""

    intercepted_binops = frozenset({"**", "*", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options):
        super().__init__(**options)
        self.globals["range"] = bounded_range
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it
        self.finalize = _finalize

    def wrap_filters(self) -> None:
        """Call once every filter is registered."""
        self.filters = {name: _runtime_filter(name, f) for name, f in self.filters.items()}

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def call_binop(self, context, operator, left, right):
        _tick()
        _check_binop(operator, left, right)
        return _built(self.binop_table[operator](left, right))

    @staticmethod
    def bounded_slice(value):
        _tick()
        return _built(value)  # a slice is a copy

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja's own signature
        _tick()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(target, "__name__", ""), args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

    @staticmethod
    def bounded_iter(iterable):
        for item in iterable:
            _tick()
            yield item

    @staticmethod
    def bounded_concat(values: tuple) -> str:
        total = 0
        for v in values:
            total += len(v) if isinstance(v, str) else printed_size(v)
            if total > MAX_CHARS:
                raise TemplateLimitError(f"'~' would build more than {MAX_CHARS} characters")
        return _built("".join(map(str, values)))

    @staticmethod
    def concat(chunks) -> str:
        """Joins a block's output (macros, `{% set %}` blocks, the whole render)."""
        parts, total = [], 0
        for chunk in chunks:
            total += len(chunk)
            if total > MAX_CHARS:
                raise TemplateLimitError(f"a block renders more than {MAX_CHARS} characters")
            parts.append(chunk)
        return _built("".join(parts))


def _finalize(value):
    """Every `{{ value }}` before it prints."""
    _check_printed(value, "an output value")
    return value
