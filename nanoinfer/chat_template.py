"""Chat templates: Jinja programs shipped in model files, rendered in a sandbox like transformers'
(so prompts match it byte for byte) within a time and size budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import string
import time
from collections import abc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

# ---------------------------------------------------------------------------------------------
# Chat template limits
# ---------------------------------------------------------------------------------------------

# A chat template is code (shipped with the model or sent by a caller). Rendering gets a time
# budget and a size cap, checked at every loop step, call, attribute, operator, filter and output,
# so a hostile or buggy template fails with ValueError instead of hanging a worker or eating memory.
CHAT_TEMPLATE_TIMEOUT_S = 5.0
CHAT_TEMPLATE_MAX_CHARS = 1 << 24  # also caps the length of lists a template builds
# Strings and lists a render may create in total, as a multiple of the cap: each one within the
# cap, but many of them kept in a list or a macro's buffer would still add up.
_TOTAL_FACTOR = 8
_MAX_INT_BITS = 1 << 16  # integers beyond this only burn CPU (str() refuses them anyway)


class _TemplateLimitError(Exception):
    """A render went past its deadline or size cap (the caller gets it as ValueError)."""


@dataclass
class _Limits:
    deadline: float  # time.monotonic() value
    timeout_s: float
    max_chars: int
    spent: int = 0  # characters (or list items) created so far


# Per render, not global: renders run concurrently in worker threads, each with its own context.
_LIMITS: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("chat_template_limits", default=None)


@contextlib.contextmanager
def render_limits(timeout_s: float | None = None, max_chars: int | None = None) -> Iterator[None]:
    """Limits for the renders inside the block; a nested block keeps the outer (shared) deadline."""
    if _LIMITS.get() is not None:
        yield
        return
    timeout = CHAT_TEMPLATE_TIMEOUT_S if timeout_s is None else timeout_s
    cap = CHAT_TEMPLATE_MAX_CHARS if max_chars is None else max_chars
    token = _LIMITS.set(_Limits(time.monotonic() + timeout, timeout, cap))
    try:
        yield
    finally:
        _LIMITS.reset(token)


def _check_time() -> None:
    limits = _LIMITS.get()
    if limits is not None and time.monotonic() > limits.deadline:
        raise _TemplateLimitError(f"chat template took longer than {limits.timeout_s:g} s to render")


def _max_chars() -> int:
    # Outside a render (constant folding while compiling) the module default still applies.
    limits = _LIMITS.get()
    return CHAT_TEMPLATE_MAX_CHARS if limits is None else limits.max_chars


def _check_size(size: int) -> None:
    cap = _max_chars()
    if size > cap:
        raise _TemplateLimitError(f"chat template would produce more than {cap} characters")


def _spend_chars(n: int) -> None:
    limits = _LIMITS.get()
    if limits is not None:
        limits.spent += n
        if limits.spent > _TOTAL_FACTOR * limits.max_chars:
            total = _TOTAL_FACTOR * limits.max_chars
            raise _TemplateLimitError(f"chat template built more than {total} characters in all")


def _spend(result: Any) -> Any:
    """Count a newly made string or list against the render's total; returns it."""
    if isinstance(result, (str, list, tuple)):
        _spend_chars(len(result))
    return result


def _children(x: Any) -> Iterable[Any] | None:
    """The parts of a container that its text form repeats; None for a leaf."""
    if isinstance(x, abc.Mapping):
        return [*x.keys(), *x.values()]
    if isinstance(x, jinja2.utils.Namespace):
        return _children(object.__getattribute__(x, "_Namespace__attrs"))
    if isinstance(x, (list, tuple, set, frozenset, abc.KeysView, abc.ValuesView, abc.ItemsView)):
        return x
    return None


def _weight(x: Any) -> int:
    """About how many characters `x` turns into as text, counting shared references every time.

    `[s, s, s]` costs nothing to build but prints s three times, so sizes are checked where values
    become text. Counting stops past the cap, so checking a huge structure stays cheap.
    """
    cap = _max_chars()
    memo: dict[int, int] = {}

    def walk(y: Any) -> int:
        if isinstance(y, (str, bytes)):
            return len(y)
        if isinstance(y, int):
            return y.bit_length() // 3 + 2
        parts = _children(y)
        if parts is None:
            return 24  # floats, None, objects: short reprs
        if id(y) in memo:
            return memo[id(y)]
        memo[id(y)] = cap + 1  # a container that reaches itself counts as too big
        total = 2
        for part in parts:
            total += walk(part) + 2
            if total > cap:
                break
        memo[id(y)] = total
        return total

    return walk(x)


def _check_text(x: Any) -> None:
    _check_size(_weight(x))


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _check_printf(fmt: str, args: Any) -> None:
    """`fmt % args` must stay within the cap (field widths included)."""
    values = args if isinstance(args, tuple) else (args,)
    widest = 0
    specs = _PRINTF_SPEC.findall(fmt)
    for width, precision in specs:
        for n in (width, precision):
            if n == "*":
                widest = max([widest, *(abs(v) for v in values if isinstance(v, int))])
            elif n:
                widest = max(widest, int(n))
    _check_size(len(fmt) + len(specs) * (widest + _weight(args)))


def _check_str_format(fmt: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """`fmt.format(*args, **kwargs)` must stay within the cap (field widths included)."""
    fields, widest, nested = 0, 0, False
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is not None:
            fields += 1
            widest = max([widest, *(int(n) for n in re.findall(r"\d+", spec or ""))])
            nested = nested or "{" in (spec or "")
    if nested:  # widths taken from the arguments
        widest = max([widest, *(abs(v) for v in (*args, *kwargs.values()) if isinstance(v, int))])
    _check_size(len(fmt) + fields * (widest + _weight(args) + _weight(kwargs)))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `left <operator> right` before computing it when the result would be huge."""
    sized = (str, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int):
                _check_size(len(seq) * max(n, 0))
        both_ints = isinstance(left, int) and isinstance(right, int)
        if both_ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise _TemplateLimitError("chat template computed a too large number")
    elif operator == "**":
        both_ints = isinstance(left, int) and isinstance(right, int)
        if both_ints and abs(left) > 1 and right > 0 and right * left.bit_length() > _MAX_INT_BITS:
            raise _TemplateLimitError("chat template computed a too large number")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right))
    elif operator == "%" and isinstance(left, str):
        _check_printf(left, right)


def _check_str_method(method: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Size check for the str methods whose result can dwarf their inputs; returns the args to use."""
    s, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(s, str) or not args:
        return args
    first = args[0]
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(first, int):
        _check_size(max(len(s), first))
    elif name == "expandtabs" and isinstance(first, int):
        _check_size(len(s) + s.count("\t") * max(first, 0))
    elif name == "replace" and len(args) >= 2 and isinstance(first, str) and isinstance(args[1], str):
        _check_size(_replaced_size(s, first, args[1], args[2] if len(args) > 2 else -1))
    elif name == "join":
        items = first if isinstance(first, abc.Collection) else list(first)  # a generator is read once
        _check_size(_weight(items) + len(s) * len(items))
        return (items, *args[1:])
    elif name == "translate":
        _check_size(len(s) * (1 + _weight(first)))
    return args


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = len(s) + 1 if not old else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


# Pre-checks of filters whose output can be much larger than their input; each takes the filter's
# own parameters (after any context argument) and returns the value to filter.
def _center_check(value: Any, width: int = 80) -> Any:
    _check_size(max(_weight(value), width if isinstance(width, int) else 0))
    return value


def _as_text(value: Any) -> str:
    """str(value), once its size is known to be within the cap."""
    _check_text(value)
    return str(value)


def _indent_check(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> Any:
    text = _as_text(s)
    w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _check_size(len(text) + (text.count("\n") + 1) * w)
    return s


def _format_check(value: Any, *args: Any, **kwargs: Any) -> Any:
    _check_printf(_as_text(value), kwargs or args)
    return value


def _join_check(value: Any, d: str = "", attribute: Any = None) -> Any:
    items = value if isinstance(value, abc.Collection) else list(value)  # a generator is read once
    _check_size(_weight(items) + len(_as_text(d)) * len(items))
    return items


def _replace_check(s: Any, old: str, new: str, count: int | None = None) -> Any:
    _check_size(_replaced_size(_as_text(s), _as_text(old), _as_text(new), count))
    return s


def _wordwrap_check(
    s: Any, width: int = 79, break_long_words: bool = True, wrapstring: str | None = None, break_on_hyphens: bool = True
) -> Any:
    _check_size(len(_as_text(s)) * (1 + len(wrapstring or "\n")))  # at worst a line per character
    return s


def _batch_check(value: Any, linecount: int, fill_with: Any = None) -> Any:
    if fill_with is not None and isinstance(linecount, int):
        _check_size(linecount * (1 + _weight(fill_with)))
    return value


def _slice_check(value: Any, slices: int, fill_with: Any = None) -> Any:
    if isinstance(slices, int) and slices > MAX_RANGE:  # one Python loop step per slice
        raise _TemplateLimitError(f"chat template asked for more than {MAX_RANGE} slices")
    return value


def _sum_check(iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    items = iterable if isinstance(iterable, abc.Collection) else list(iterable)
    if isinstance(start, (str, list, tuple)):  # concatenation: sizes add up
        _check_size(len(start) + sum(len(i) for i in items if isinstance(i, (str, list, tuple))))
    return items


def _text_check(value: Any, *args: Any, **kwargs: Any) -> Any:
    _check_text(value)
    return value


_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "center": _center_check,
    "indent": _indent_check,
    "format": _format_check,
    "join": _join_check,
    "replace": _replace_check,
    "wordwrap": _wordwrap_check,
    "batch": _batch_check,
    "slice": _slice_check,
    "sum": _sum_check,
    # These turn any value into text first: a list full of one big string would blow up.
    **{
        name: _text_check
        for name in (
            "capitalize",
            "e",
            "escape",
            "forceescape",
            "lower",
            "pprint",
            "safe",
            "string",
            "striptags",
            "title",
            "trim",
            "truncate",
            "upper",
            "urlencode",
            "urlize",
            "wordcount",
            "xmlattr",
            "tojson",
        )
    },
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with a deadline check and, for the filters that can grow their input, a size check."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # context / environment argument first

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja passes the same arguments
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_time()
        if check is not None and len(args) > skip:
            args = (*args[:skip], check(*args[skip:], **kwargs), *args[skip + 1 :])
        return _spend(func(*args, **kwargs))

    return guarded


@jinja2.pass_context  # context-taking filters are never run at compile time
def _guarded_loop(context: Any, iterable: Any) -> Iterator[Any]:
    """What every `{% for %}` iterates: the same items, with a deadline check per step."""
    for item in iterable:
        _check_time()
        yield item


@jinja2.pass_eval_context
def _guarded_concat(eval_ctx: Any, parts: list[Any]) -> str:
    """The `~` operator, with a size check; joins exactly as Jinja's compiled code would."""
    _check_size(sum(_weight(p) for p in parts))
    return _spend((markup_join if eval_ctx.volatile or eval_ctx.autoescape else str_join)(parts))


def _guarded_slice(value: Any, start: Any, stop: Any, step: Any) -> Any:
    """`value[start:stop:step]`: a copy, so it counts against the render's total."""
    return _spend(value[start:stop:step])


def _guarded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    _check_size(n * max * 16)  # at most max words of at most ~12 letters per paragraph
    return generate_lorem_ipsum(n, html, min, max)


_LOOP_FILTER = "_nanoinfer_guarded_loop"
_CONCAT_FILTER = "_nanoinfer_guarded_concat"
_SLICE_FILTER = "_nanoinfer_guarded_slice"


class _AddGuards(NodeTransformer):
    """Routes for loops, `~` and slices through the guarded filters above (Jinja has no hook for them)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # transforms the children in place and returns `node` itself
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(
            nodes.List(node.nodes, lineno=node.lineno), _CONCAT_FILTER, [], [], None, None, lineno=node.lineno
        )

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.arg, nodes.Slice):
            return node  # plain subscripts already go through environment.getitem
        bounds = [
            b if b is not None else nodes.Const(None, lineno=node.lineno)
            for b in (node.arg.start, node.arg.stop, node.arg.step)
        ]
        return nodes.Filter(node.node, _SLICE_FILTER, bounds, [], None, None, lineno=node.lineno)


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox plus deadline and size checks at every point where a template can spend time or memory."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _AddGuards().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        # Every join of template output goes through here: the render itself, macros, block sets.
        out: list[str] = []
        total = 0
        for part in parts:
            total += len(part)
            _check_size(total)
            _check_time()
            out.append(part)
        return _spend("".join(out))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        _check_binop(operator, left, right)
        return _spend(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        return _spend(super().call(context, obj, *_check_str_method(obj, args), **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_time()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map":
                _check_str_format(fmt, (), dict(args[0]) if args and isinstance(args[0], abc.Mapping) else {})
            else:
                _check_str_format(fmt, args, kwargs)
            return wrapper(*args, **kwargs)

        return functools.update_wrapper(checked, value)


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps output.
    if indent is None:
        return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    # Indentation repeats per line and level: write piece by piece, checking the size as it grows.
    _check_size(len(indent) if isinstance(indent, str) else indent)
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _GuardedEnvironment.concat(encoder.iterencode(x))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _check_output(value: Any) -> Any:
    # finalize: runs on every {{ value }} before it becomes text (also inside macros and blocks).
    weight = _weight(value)
    _check_size(weight)
    _spend_chars(weight)
    return value


def _make_environment() -> _GuardedEnvironment:
    # trim_blocks/lstrip_blocks and loopcontrols: what transformers uses, so output matches it.
    env = _GuardedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], finalize=_check_output
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = _guarded_loop
    env.filters[_CONCAT_FILTER] = _guarded_concat
    env.filters[_SLICE_FILTER] = _guarded_slice
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    env.globals["lipsum"] = _guarded_lipsum
    return env


_ENV = _make_environment()


class ChatTemplate:
    """A compiled chat template, rendered in a sandbox within a time and size budget."""

    def __init__(
        self,
        source: str,
        special_tokens: dict[str, str | None] | None = None,
        *,
        timeout_s: float | None = None,
        max_chars: int | None = None,
    ) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.timeout_s = timeout_s  # None: CHAT_TEMPLATE_TIMEOUT_S at render time
        self.max_chars = max_chars  # None: CHAT_TEMPLATE_MAX_CHARS at render time
        try:
            self._template = _ENV.from_string(source)
            # The variables the template reads from its caller: tells e.g. whether it shows tools.
            self.variables = frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(source)))
        except jinja2.TemplateError as e:
            raise ValueError(f"invalid chat template: {e}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra_vars: Any) -> str:
        """Render a conversation to the prompt string."""
        variables: dict[str, Any] = {"tools": None, "documents": None}
        variables.update(self.special_tokens)
        variables.update(extra_vars)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            with render_limits(self.timeout_s, self.max_chars):
                return self._template.render(**variables)
        except _TemplateLimitError as e:
            raise ValueError(str(e)) from None
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"chat template tried an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None
        except Exception as e:  # a template bug (bad index, type error...) is the caller's input error
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
