"""Render a model's Jinja chat template (GGUF ``tokenizer.chat_template`` or
Hugging Face ``chat_template``) the way ``transformers``' ``apply_chat_template``
does, inside jinja2's immutable sandbox.

Chat templates come from model files: untrusted input. They run in
``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of the data passed in) and see only plain JSON-like data. Beyond the
sandbox, each render has a :class:`~ember.templates.budget.Budget` of work,
sizes and memory: the code generator counts every loop iteration, comparison,
slice and block output, and every filter, method, operator and printed value
is checked against an upper bound on its result before it allocates. The
context matches Hugging Face's: ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, special tokens, ``raise_exception``,
``strftime_now``, ``tojson`` with ``indent``/``ensure_ascii``/``separators``/
``sort_keys``, the ``loopcontrols`` extension and ``{% generation %}`` blocks,
``trim_blocks`` and ``lstrip_blocks``. Every failure is a TemplateError that
names the template line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, cast

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame, operators
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from ember.errors import TemplateError
from ember.templates.budget import (
    CALL_UNITS,
    ITEM_CELLS,
    MAX_CHARS,
    MAX_INT_BITS,
    Budget,
    BudgetExceeded,
    current,
    shallow_cells,
    using,
)

__all__ = ["JinjaChatTemplate", "MAX_CHARS"]

# The largest integer argument a filter or method accepts: round(5, -10**6)
# alone computes a million-digit power of ten.
MAX_INT_ARGUMENT = 1_000_000
# Filters that print their input first (a list becomes its repr).
_TEXT_FILTERS = frozenset({
    "capitalize", "center", "e", "escape", "filesizeformat", "forceescape", "format", "indent", "lower", "replace",
    "safe", "string", "striptags", "title", "trim", "truncate", "upper", "urlencode", "wordcount", "wordwrap",
})
# Filters that work item by item or character by character in Python
# (callbacks, regular expressions, textwrap): charged per item or character,
# not per CHARS_PER_UNIT.
_SLOW_FILTERS = frozenset({
    "batch", "dictsort", "groupby", "items", "map", "max", "min", "reject", "rejectattr", "select", "selectattr",
    "slice", "sort", "striptags", "title", "unique", "wordcount", "wordwrap",
})
# Filters that make a list of the items of a sequence (of the characters of a string).
_LIST_FILTERS = frozenset({
    "batch", "groupby", "list", "map", "reject", "rejectattr", "select", "selectattr", "slice", "sort", "unique",
})
# Filters that return a number or one of the values they are given.
_SCALAR_FILTERS = frozenset({
    "abs", "attr", "count", "d", "default", "first", "float", "int", "last", "length", "max", "min", "random",
    "wordcount",
})
# Left out: HTML and debugging helpers no chat template uses, whose output
# size has no simple bound (pformat's indentation, urlize's markup).
_LEFT_OUT_FILTERS = ("pprint", "urlize", "xmlattr")
# Tests that compare values: as costly as the values are large.
_COMPARING_TESTS = frozenset({
    "in", "==", "eq", "equalto", "!=", "ne", ">", "gt", "greaterthan", "ge", ">=", "<", "lt", "lessthan", "<=", "le",
})
_GROWTH = 4  # how much longer a filter or method may make its input (upper() can triple a character)
_ESCAPED = 6  # Markup (from |safe or |e) escapes what it is combined with: " is &#34;


class _TemplateRaised(Exception):
    """raise_exception() called by a template: its message goes to the user."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _expand(value: Any) -> Any:
    """What a namespace() prints: its attributes (for Budget.measure)."""
    if isinstance(value, jinja2.utils.Namespace):
        return object.__getattribute__(value, "_Namespace__attrs")
    return None


def _text(b: Budget, value: Any) -> int:
    return b.text_bound(value, _expand)


def _escaping(value: Any) -> int:
    """How much longer a Markup makes what it formats, joins or adds."""
    return _ESCAPED if isinstance(value, Markup) else 1


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if type(a) is int and abs(a) > MAX_INT_ARGUMENT:
            raise BudgetExceeded(f"argument {a} is above {MAX_INT_ARGUMENT}")


def _ints(values: Sequence[Any]) -> int:
    return sum(abs(v) for v in values if type(v) is int)


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _format_bound(b: Budget, fmt: Any, values: Sequence[Any], reused: bool) -> int:
    """The longest text ``fmt % values`` or ``fmt.format(...)`` can give: the
    format string, every number written in it (widths, precisions), integer
    arguments (``*`` widths) and each argument printed, once per field when
    fields can name the same argument again."""
    text = str(fmt)
    b.scan(len(text))
    numbers = sum(int(n) for n in re.findall(r"\d+", text))
    printed = [_text(b, v) for v in values]
    if reused:
        args = (text.count("%") + text.count("{")) * max(printed, default=0)
    else:
        args = sum(printed)
    return len(text) + numbers + _ints(values) + args


def _materialize(b: Budget, value: Any) -> Any:
    """A list of what an iterable yields (a string, list or tuple as it is),
    counted as it is pulled."""
    if isinstance(value, (str, list, tuple)):
        return value
    items = []
    for item in value:
        b.spend()
        items.append(item)
        b.allow(ITEM_CELLS * len(items), "a list")
    return items


# Upper bounds on what a filter returns, computed (and charged) before it
# runs: (budget, value, its size, args, kwargs) -> characters or items.
_Bound = Callable[[Budget, Any, int, Sequence[Any], Mapping[str, Any]], int]


def _join_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    sep = _text(b, _arg(args, kwargs, 0, "d", ""))
    b.spend(len(value))
    return sum(_text(b, item) for item in value) + sep * max(len(value) - 1, 0)


def _tojson_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    measured = b.measure(value, _expand)
    indent = _arg(args, kwargs, 1, "indent")
    step = len(indent) if isinstance(indent, str) else int(indent or 0)
    separators = _text(b, _arg(args, kwargs, 2, "separators", ()))
    per_char = 12 if _arg(args, kwargs, 0, "ensure_ascii", False) else 6  # \ud83d\ude00, \u0000
    return per_char * measured.chars + measured.items * (8 + separators + step * measured.depth)


def _indent_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    width = _arg(args, kwargs, 0, "width", 4)
    step = len(width) if isinstance(width, str) else int(width)
    lines = value.count("\n") + 1 if isinstance(value, str) else size
    return size + lines * step


def _replace_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    old, new, count = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", ""), _arg(args, kwargs, 2, "count")
    hits = value.count(old) if isinstance(value, str) and isinstance(old, str) and old else size + 1
    if type(count) is int and count >= 0:
        hits = min(hits, count)
    return size + hits * _text(b, new)


def _format_filter_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return _format_bound(b, value, list(kwargs.values()) or list(args), reused=bool(kwargs))


def _wordwrap_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    wrap = _arg(args, kwargs, 2, "wrapstring") or "\n"
    return size + (size + 1) * _text(b, wrap)


def _sum_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    start = _arg(args, kwargs, 1, "start", 0)
    if start is None or isinstance(start, (bool, int, float)):
        return 24  # a number (checked against MAX_INT_BITS afterwards)
    total = b.read(start) + sum(b.read(item) for item in value)
    b.scan(total * len(value))  # every step copies the sum so far
    return total


def _round_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    precision = _arg(args, kwargs, 0, "precision", 0)
    if type(precision) is int and abs(precision) > 1000:
        raise BudgetExceeded(f"round() to {precision} digits")  # computes 10 ** precision
    return 24


def _scalar_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return 0


def _print_bound(factor: int) -> _Bound:
    return lambda b, value, size, args, kwargs: factor * size


def _generic_bound(b: Budget, value: Any, size: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return _GROWTH * (size + sum(b.read(a) for a in (*args, *kwargs.values()))) + _ints([*args, *kwargs.values()])


_FILTER_BOUNDS: dict[str, _Bound] = {
    "join": _join_bound,
    "tojson": _tojson_bound,
    "indent": _indent_bound,
    "replace": _replace_bound,
    "format": _format_filter_bound,
    "wordwrap": _wordwrap_bound,
    "sum": _sum_bound,
    "round": _round_bound,
    "string": _print_bound(1),
    "e": _print_bound(6),  # &#34;
    "escape": _print_bound(6),
    "forceescape": _print_bound(6),
    "urlencode": _print_bound(12),  # %F0%9F%98%80
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Context-taking filters get the context (or environment) first.
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    bound = _FILTER_BOUNDS.get(name, _scalar_bound if name in _SCALAR_FILTERS else _generic_bound)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        b = current()
        b.spend(CALL_UNITS)
        value, rest = args[skip], args[skip + 1 :]
        _check_args(rest, kwargs)
        if name in ("join", "sum"):  # their bounds look at every item
            value = _materialize(b, value)
            args = (*args[:skip], value, *rest)
        if name in _TEXT_FILTERS:
            size = _text(b, value)
        else:
            size = b.read(value) * (ITEM_CELLS if isinstance(value, str) and name in _LIST_FILTERS else 1)
        if name in _SLOW_FILTERS:
            b.spend(len(value) if hasattr(value, "__len__") else 1)
        b.allow(bound(b, value, size, rest, kwargs) * _escaping(value), f"the {name} filter")
        result = func(*args, **kwargs)
        if result is not value:
            b.allocate(result, f"the {name} filter")
        return b.check_int(result)

    return wrapper


def _bounded_test(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    compares = name in _COMPARING_TESTS

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        b = current()
        b.spend(CALL_UNITS)
        if compares:
            for a in args:
                b.measure(a, _expand)
        return func(*args, **kwargs)

    return wrapper


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # As Hugging Face's override: no HTML escaping, json.dumps options exposed.
    if separators is not None:
        separators = tuple(separators)
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    except TypeError as e:  # Undefined and other non-JSON values
        raise TypeError(f"tojson: {e}") from None


def _strftime_now(fmt: str) -> str:
    b = current()
    b.allow(16 * _text(b, fmt), "strftime_now()")  # %c is 24 characters
    return datetime.now().strftime(fmt)


def _range(*args: int) -> range:
    """``range()`` for templates: loops over it are counted like any loop;
    here only its length is bounded."""
    r = range(*args)
    current().allow(ITEM_CELLS * len(r), "range()")
    return r


def _bounded_lipsum(n: int = 5, html: bool = False, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja2's names
    # jinja2's lorem ipsum generator; lipsum(n=10**5, max=10**5) would run for minutes.
    if n * max > 100_000:
        raise BudgetExceeded("lipsum() asked for more than 100000 words")
    return str(jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max))


class _DictFactory:
    """``dict(...)`` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja2's Namespace signature
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})"
            )


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for
    training masks in Hugging Face; for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _OutputBuffer(list):  # type: ignore[type-arg]
    """Where macros, ``{% set %}`` blocks and filter blocks collect their
    output before joining it: every piece is charged as it comes."""

    def append(self, piece: Any) -> None:
        current().allocate(piece, "the output of a block")
        super().append(piece)

    def extend(self, pieces: Any) -> None:
        for piece in pieces:
            self.append(piece)


class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator, with hooks where a template does work that
    no sandbox method sees: loops, comparisons, slices, ``~`` and block
    output."""

    def visit_For(self, node: jinja2.nodes.For, frame: Frame) -> None:
        # Iterate through Environment.counted (one unit per item).
        counted = jinja2.nodes.EnvironmentAttribute("counted", lineno=node.lineno)
        node.iter = jinja2.nodes.Call(counted, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Compare(self, node: jinja2.nodes.Compare, frame: Frame) -> None:
        self.write("(environment.compared(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.write(f" {operators[op.op]} environment.compared(")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")

    def visit_Getitem(self, node: jinja2.nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, jinja2.nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.allocated(")
        super().visit_Getitem(node, frame)
        self.write(")")

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounded_binop(op: Callable[[Any, Any], Any], name: str) -> Callable[[Any, Any], Any]:
    def run(left: Any, right: Any) -> Any:
        b = current()
        b.spend(CALL_UNITS)
        if name == "*" and _is_int(left) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if name == "*" and isinstance(left, (str, list, tuple)) and _is_int(right):
            b.allow(shallow_cells(left) * right, "repeating a value")
        elif name == "*" and _is_int(left) and _is_int(right):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise BudgetExceeded(f"a product of more than {MAX_INT_BITS} bits")
        elif name == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            if right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS + 1:
                raise BudgetExceeded(f"{left} ** {right} has more than {MAX_INT_BITS} bits")
        elif name == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            b.allow((shallow_cells(left) + shallow_cells(right)) * _escaping(left) * _escaping(right), "adding two values")
        elif name == "%" and isinstance(left, str):
            if isinstance(right, Mapping):
                bound = _format_bound(b, left, list(right.values()), reused=True)
            else:
                bound = _format_bound(b, left, right if isinstance(right, tuple) else (right,), reused=False)
            b.allow(bound * _escaping(left), "% formatting")
        return b.check_int(b.allocate(op(left, right)))

    return run


# str methods whose result can be much longer than the string and the
# arguments: (budget, string, args, kwargs) -> bound.
def _str_replace_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return _replace_bound(b, s, len(s), args, kwargs)


def _str_join_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    items = args[0] if args else ()
    b.spend(len(items))
    return sum(_text(b, item) for item in items) + len(s) * max(len(items) - 1, 0)


def _str_expandtabs_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    size = _arg(args, kwargs, 0, "tabsize", 8)
    return len(s) + s.count("\t") * (size if _is_int(size) else 8)


def _str_translate_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    table = args[0] if args else {}
    longest = max((_text(b, v) for v in table.values()), default=1) if isinstance(table, Mapping) else 1
    return len(s) * max(longest, 1)


# What str.isspace() and str.splitlines() split on.
_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _str_split_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    sep, limit = _arg(args, kwargs, 0, "sep"), _arg(args, kwargs, 1, "maxsplit", -1)
    cuts = s.count(sep) if isinstance(sep, str) and sep else sum(map(s.count, _WHITESPACE))
    if _is_int(limit) and limit >= 0:
        cuts = min(cuts, limit)
    return len(s) + ITEM_CELLS * (cuts + 1)


def _str_splitlines_bound(b: Budget, s: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return len(s) + ITEM_CELLS * (sum(map(s.count, _LINE_BREAKS)) + 1)


_STR_METHOD_BOUNDS: dict[str, Callable[[Budget, str, Sequence[Any], Mapping[str, Any]], int]] = {
    "split": _str_split_bound,
    "rsplit": _str_split_bound,
    "splitlines": _str_splitlines_bound,
    "replace": _str_replace_bound,
    "join": _str_join_bound,
    "expandtabs": _str_expandtabs_bound,
    "translate": _str_translate_bound,
}


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=self.printed, **kwargs)
        self.binop_table = {
            **self.binop_table,
            **{name: _bounded_binop(self.binop_table[name], name) for name in self.intercepted_binops},
        }

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's names
        # Every call a template makes: str and list methods are checked before
        # they allocate (ljust(10**6), replace('', big), join of a huge list).
        b = current()
        b.spend(CALL_UNITS)
        _check_args(args, kwargs)
        if isinstance(__obj, jinja2.runtime.LoopContext) and args:
            args = (__self.counted(args[0]), *args[1:])  # loop(children) in a recursive loop
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, (str, list, tuple, dict)):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                args = (_materialize(b, iter(args[0])), *args[1:])
            size = b.measure(receiver).cells if isinstance(receiver, (list, tuple)) else b.read(receiver)
            special = _STR_METHOD_BOUNDS.get(name)
            if isinstance(receiver, str) and special is not None:
                bound = special(b, receiver, args, kwargs)
            else:
                bound = _generic_bound(b, receiver, size, args, kwargs)
            b.allow(bound * _escaping(receiver), f"{type(receiver).__name__}.{name}()")
        result = super().call(__context, __obj, *args, **kwargs)
        if result is not receiver:
            b.allocate(result)
        return b.check_int(result)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            values = [*args, *kwargs.values()]
            if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                values = list(args[0].values())
            b = current()
            b.allow(_format_bound(b, fmt, values, reused=True) * _escaping(fmt), "str.format()")
            return str(b.allocate(wrapped(*args, **kwargs)))

        return functools.update_wrapper(bounded, wrapped)

    def getattr(self, obj: Any, attribute: str) -> Any:
        current().spend(CALL_UNITS // 2)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current().spend(CALL_UNITS // 2)
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja2 returns an Undefined that prints as "" and fails only when
        # used further; refuse at once so probing templates fail loudly.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    # Hooks the code generator writes calls to (see _BoundedCodeGenerator).
    @staticmethod
    def counted(iterable: Any) -> Iterator[Any]:
        b = current()
        for item in iterable:
            b.spend()
            yield item

    @staticmethod
    def compared(value: Any) -> Any:
        b = current()
        b.spend(2)
        b.measure(value, _expand)
        return value

    @staticmethod
    def allocated(value: Any) -> Any:
        return current().allocate(value)

    @staticmethod
    def bounded_concat(parts: Sequence[Any]) -> str:
        b = current()
        b.allow(sum(_text(b, p) for p in parts), "~")
        return str(b.allocate("".join(map(str, parts))))

    @staticmethod
    def output_buffer() -> _OutputBuffer:
        return _OutputBuffer()

    @staticmethod
    def printed(value: Any) -> Any:
        """jinja2's finalize: every ``{{ value }}`` passes here before str()."""
        if not isinstance(value, str):
            b = current()
            b.allow(_text(b, value), "printing a value")
        return value


def _plain(value: Any) -> Any:
    """A copy made only of JSON types, so templates never see objects with
    methods the sandbox does not know about."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"message {i + 1}: must be an object with 'role' and 'content'")
        # As transformers: keys whose value is None are dropped (OpenAI sends
        # content=None with tool calls; templates test for missing keys).
        msg = {k: v for k, v in _plain(m).items() if v is not None}
        # OpenAI-style tool calls carry arguments as a JSON string; chat
        # templates expect an object (they apply |tojson themselves).
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        parsed = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                    except ValueError:
                        raise TemplateError(
                            f"message {i + 1}: tool call arguments are not valid JSON: {fn['arguments'][:80]!r}"
                        ) from None
                    fn["arguments"] = parsed
        # Ollama names reasoning "thinking"; HF templates read "reasoning_content".
        for key in ("reasoning_content", "thinking", "reasoning"):
            if msg.get(key) is not None:
                reasoning = msg[key]
                msg.setdefault("thinking", reasoning)
                msg["reasoning_content"] = reasoning
                break
        out.append(msg)
    return out


def _make_environment() -> _Environment:
    env = _Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        undefined=jinja2.Undefined,
        autoescape=False,
    )
    filters = {**env.filters, "tojson": _tojson}
    for name in _LEFT_OUT_FILTERS:
        del filters[name]
    env.filters = {name: _bounded_filter(name, f) for name, f in filters.items()}
    env.tests = {name: _bounded_test(name, cast(Callable[..., Any], f)) for name, f in env.tests.items()}
    env.globals["range"] = _range
    env.globals["lipsum"] = _bounded_lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env


_ENV = _make_environment()


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line of the innermost template frame: jinja2 rewrites
    tracebacks so template code shows as ``<template>`` with its own lines."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _where(line: int | None) -> str:
    return f"chat template line {line}" if line else "chat template"


@functools.lru_cache(maxsize=32)
def _compile(text: str) -> jinja2.Template:
    # Compiling a real chat template takes 40-60 ms; a server parses the same
    # few templates for every request.
    try:
        with using(Budget()):  # jinja2 evaluates constant expressions while compiling
            return _ENV.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"{_where(e.lineno)}: {e.message or 'syntax error'}") from None
    except (jinja2.exceptions.TemplateError, RecursionError, ValueError) as e:
        raise TemplateError(f"chat template: {e or type(e).__name__}") from None


class JinjaChatTemplate:
    """A compiled Jinja chat template; TemplateError on syntax errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.template = _compile(text)

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.text

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Render like ``tokenizer.apply_chat_template(..., tokenize=False)``."""
        context: dict[str, Any] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            **(_plain(dict(extra)) if extra else {}),
            "messages": _prepare_messages(messages),
            "tools": _plain(list(tools)) if tools is not None else None,
            "documents": _plain(list(documents)) if documents is not None else None,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            with using(Budget()) as b:
                out: list[str] = []
                size = 0
                for chunk in self.template.generate(**context):
                    size += len(chunk)
                    b.allow(size, "the prompt")
                    b.allocate(chunk, "the prompt")
                    out.append(chunk)
                return "".join(out)
        except _TemplateRaised as e:
            raise TemplateError(f"{_where(_template_line(e.__traceback__))}: {e}") from None
        except BudgetExceeded as e:
            raise TemplateError(f"{_where(_template_line(e.__traceback__))}: template too expensive: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{_where(_template_line(e.__traceback__))}: unsafe operation refused: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            line = getattr(e, "lineno", None) or _template_line(e.__traceback__)
            raise TemplateError(f"{_where(line)}: {getattr(e, 'message', None) or e}") from None
        except RecursionError:
            raise TemplateError("chat template: recursion too deep") from None
        except MemoryError:
            raise TemplateError("chat template: out of memory while rendering") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise TemplateError(f"{_where(_template_line(e.__traceback__))}: {type(e).__name__}: {e}") from None
