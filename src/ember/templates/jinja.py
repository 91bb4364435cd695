"""Render a model's Jinja chat template (GGUF ``tokenizer.chat_template`` or
Hugging Face ``chat_template``) the way ``transformers``' ``apply_chat_template``
does, inside jinja2's immutable sandbox.

Chat templates come from model files: untrusted input. They run in
``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of the data passed in), see only plain JSON-like data, and get a
bounded ``range``. The context matches Hugging Face's: ``messages``,
``tools``, ``documents``, ``add_generation_prompt``, special tokens,
``raise_exception``, ``strftime_now``, ``tojson`` with ``indent``/
``ensure_ascii``/``separators``/``sort_keys``, the ``loopcontrols`` extension
and ``{% generation %}`` blocks, ``trim_blocks`` and ``lstrip_blocks``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import TemplateError

__all__ = ["JinjaChatTemplate"]


class _TemplateRaised(Exception):
    """raise_exception() called by a template: its message goes to the user."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Like Hugging Face's override: no HTML escaping, json.dumps options exposed.
    if separators is not None:
        separators = tuple(separators)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """``dict(...)`` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2's Namespace
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
        msg = _plain(m)
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
                msg.setdefault("reasoning_content", reasoning)
                msg.setdefault("thinking", reasoning)
                break
        out.append(msg)
    return out


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        undefined=jinja2.Undefined,
        autoescape=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env


_ENV = _make_environment()


def _error_message(e: BaseException) -> str:
    lineno = getattr(e, "lineno", None)
    where = f"chat template line {lineno}" if lineno else "chat template"
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return f"{where}: {msg}"


class JinjaChatTemplate:
    """A compiled Jinja chat template; TemplateError on syntax errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            self.template = _ENV.from_string(text)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(_error_message(e)) from None
        except (jinja2.exceptions.TemplateError, RecursionError, ValueError) as e:
            raise TemplateError(_error_message(e)) from None

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
            "messages": _prepare_messages(messages),
            "tools": _plain(list(tools)) if tools is not None else None,
            "documents": _plain(list(documents)) if documents is not None else None,
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": bos_token,
            "eos_token": eos_token,
        }
        if extra:
            context.update(_plain(dict(extra)))
        try:
            return self.template.render(**context)
        except _TemplateRaised as e:
            raise TemplateError(f"chat template raised an error: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(_error_message(e)) from None
        except RecursionError:
            raise TemplateError("chat template: recursion too deep") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
