"""Render a model's Jinja chat template (GGUF ``tokenizer.chat_template`` or
Hugging Face ``chat_template``) the way ``transformers``' ``apply_chat_template``
does, inside jinja2's immutable sandbox.

Chat templates come from model files: untrusted input. They run in
``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of the data passed in) and see only plain JSON-like data. Beyond the
sandbox, what a template may build is bounded (string/list sizes, range
iterations, numeric filter arguments), so a hostile template cannot exhaust
memory or CPU. The context matches Hugging Face's: ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, special tokens, ``raise_exception``,
``strftime_now``, ``tojson`` with ``indent``/``ensure_ascii``/``separators``/
``sort_keys``, the ``loopcontrols`` extension and ``{% generation %}`` blocks,
``trim_blocks`` and ``lstrip_blocks``. Every failure is a TemplateError that
names the template line.
"""

from __future__ import annotations

import contextvars
import functools
import json
import operator
import re
from datetime import datetime
from types import TracebackType
from typing import Any, Callable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import TemplateError

__all__ = ["JinjaChatTemplate", "MAX_CHARS", "MAX_ITERATIONS"]

# Bounds on what a template may build: the longest string or list one
# operation may produce (also the longest prompt), the total number of
# range() items one render may iterate, and the largest integer argument a
# filter accepts (``center(10**9)`` would allocate before any check).
MAX_CHARS = 1 << 25
MAX_ITERATIONS = 2_000_000
MAX_INT_ARGUMENT = 1_000_000

_iterations: contextvars.ContextVar[list[int]] = contextvars.ContextVar("ember_jinja_iterations")


class _LimitExceeded(Exception):
    """A template went past one of the bounds above."""


class _TemplateRaised(Exception):
    """raise_exception() called by a template: its message goes to the user."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


# A field width or precision of 7+ digits in a %- or {}-format string.
_BIG_WIDTH = re.compile(r"[%:][^%{}\s\d]{0,3}\d{7,}")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise _LimitExceeded(f"a format width above {MAX_INT_ARGUMENT}")


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if type(a) is int and abs(a) > MAX_INT_ARGUMENT:
            raise _LimitExceeded(f"argument {a} is above {MAX_INT_ARGUMENT}")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_CHARS:
        raise _LimitExceeded(f"a value grew past {MAX_CHARS} items")
    return value


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
    if isinstance(indent, int) and indent > 64:
        raise _LimitExceeded("tojson indent above 64")
    try:
        return _check_size(
            json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        )
    except TypeError as e:  # Undefined and other non-JSON values
        raise TypeError(f"tojson: {e}") from None


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _BoundedRange:
    """``range()`` for templates: each item counts against MAX_ITERATIONS for
    the whole render, so nested loops cannot run for hours."""

    def __init__(self, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > MAX_ITERATIONS:
            raise _LimitExceeded(f"range() longer than {MAX_ITERATIONS}")

    def __len__(self) -> int:
        return len(self._range)

    def __iter__(self) -> Iterator[int]:
        return self._count(iter(self._range))

    def __reversed__(self) -> Iterator[int]:
        return self._count(reversed(self._range))

    def __getitem__(self, i: Any) -> Any:
        return self._range[i]

    def __contains__(self, x: Any) -> bool:
        return x in self._range

    @staticmethod
    def _count(it: Iterator[int]) -> Iterator[int]:
        budget = _iterations.get(None)
        for x in it:
            if budget is not None:
                budget[0] += 1
                if budget[0] > MAX_ITERATIONS:
                    raise _LimitExceeded(f"more than {MAX_ITERATIONS} loop iterations")
            yield x


def _bounded_lipsum(n: int = 5, html: bool = False, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja2's names
    # jinja2's lorem ipsum generator; lipsum(n=10**5, max=10**5) would run for minutes.
    if n * max > 100_000:
        raise _LimitExceeded("lipsum() asked for more than 100000 words")
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


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a size-checked join (jinja2 emits a plain
    ``str_join`` that no sandbox hook sees)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    # The filtered value is exempt (``{{ 10**7 | string }}`` is fine); only the
    # filter's own arguments are checked. Context-taking filters get the
    # context first.
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[skip:], kwargs)
        if func.__name__ == "do_format" and len(args) > skip - 1:
            _check_format(args[skip - 1])
        return _check_size(func(*args, **kwargs))

    return wrapper


def _bounded_binop(op: Callable[[Any, Any], Any], name: str) -> Callable[[Any, Any], Any]:
    def run(left: Any, right: Any) -> Any:
        if name == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if name == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            if len(left) * right > MAX_CHARS:
                raise _LimitExceeded(f"a value grew past {MAX_CHARS} items")
        elif name == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_CHARS:
                raise _LimitExceeded(f"a value grew past {MAX_CHARS} items")
        elif name == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise _LimitExceeded("exponent above 1024")
        elif name == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return op(left, right)

    return run


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.binop_table = {
            **self.binop_table,
            "+": _bounded_binop(operator.add, "+"),
            "*": _bounded_binop(operator.mul, "*"),
            "**": _bounded_binop(operator.pow, "**"),
            "%": _bounded_binop(operator.mod, "%"),
        }

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's names
        # Every call a template makes: str/list methods such as ljust(10**9)
        # or replace('', big) would allocate before any later check.
        _check_args(args, kwargs)
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, str):
            name = getattr(__obj, "__name__", "")
            if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                hits = receiver.count(args[0]) if args[0] else len(receiver) + 1
                if len(receiver) + hits * len(args[1]) > MAX_CHARS:
                    raise _LimitExceeded(f"a value grew past {MAX_CHARS} items")
            elif name == "join" and args:
                parts = list(args[0])
                if len(receiver) * len(parts) + sum(len(str(p)) for p in parts) > MAX_CHARS:
                    raise _LimitExceeded(f"a value grew past {MAX_CHARS} items")
                args = (parts, *args[1:])
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja2 returns an Undefined that prints as "" and fails only when
        # used further; refuse at once so probing templates fail loudly.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    @staticmethod
    def bounded_concat(parts: Sequence[Any]) -> str:
        return str(_check_size("".join(map(str, parts))))


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
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["range"] = _BoundedRange
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
        token = _iterations.set([0])
        try:
            out: list[str] = []
            size = 0
            for chunk in self.template.generate(**context):
                size += len(chunk)
                if size > MAX_CHARS:
                    raise _LimitExceeded(f"the prompt grew past {MAX_CHARS} characters")
                out.append(chunk)
            return "".join(out)
        except _TemplateRaised as e:
            raise TemplateError(f"{_where(_template_line(e.__traceback__))}: {e}") from None
        except _LimitExceeded as e:
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
        finally:
            _iterations.reset(token)
