"""A parser and renderer for the part of Go's ``text/template`` that Ollama
TEMPLATEs use.

Ollama Modelfiles carry their prompt format as a Go template, so rendering the
exact bytes Ollama would send to the model needs Go's semantics, not an
approximation: whitespace trimming with ``{{-``/``-}}``, Go truthiness,
``and``/``or`` returning operands, map ranges in sorted key order, ``len``
counting UTF-8 bytes, ``fmt`` and ``encoding/json`` output formats.

Values are plain Python objects (str, int, float, bool, None, list, dict) plus
:class:`GoStruct`, :class:`GoMap` and :class:`GoList` for values that need Go
behaviour (struct field access, ``String()`` methods, JSON field tags).
``None`` stands for Go's nil interface: printed directly it renders as
``<no value>``, like a missing key of ``map[string]any`` does in Go.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ember.errors import TemplateError
from ember.templates.budget import CALL_UNITS, PRINT_FACTOR, Budget, BudgetExceeded, current, using

__all__ = [
    "GoList",
    "GoMap",
    "GoStruct",
    "GoTemplate",
    "go_json",
    "go_sprint",
    "go_sprintf",
]

# --------------------------------------------------------------------------
# Go value model


class GoStruct:
    """A Go struct value: ordered named fields, optional JSON tags and an
    optional ``String()`` method (``stringer``) used whenever it is printed."""

    __slots__ = ("type_name", "fields", "json_tags", "stringer", "marshal")

    def __init__(
        self,
        type_name: str,
        fields: dict[str, Any],
        json_tags: dict[str, tuple[str, bool]] | None = None,
        stringer: Callable[[GoStruct], str] | None = None,
        marshal: Callable[[GoStruct], Any] | None = None,
    ) -> None:
        self.type_name = type_name
        self.fields = fields
        # field name -> (json key, omitempty); fields missing here use their Go name
        self.json_tags = json_tags or {}
        self.stringer = stringer
        self.marshal = marshal

    def __repr__(self) -> str:
        return f"GoStruct({self.type_name}, {self.fields!r})"


class GoMap(dict):  # type: ignore[type-arg]
    """A Go map (ranges and marshals in sorted key order) that may carry a
    ``String()`` method and a nil flag."""

    def __init__(
        self,
        *args: Any,
        type_name: str = "map[string]interface {}",
        stringer: Callable[[GoMap], str] | None = None,
        is_nil: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.type_name = type_name
        self.stringer = stringer
        self.is_nil = is_nil


class GoList(list):  # type: ignore[type-arg]
    """A Go slice that may carry a ``String()``/``MarshalJSON()`` method and
    a nil flag (a nil slice marshals as ``null``)."""

    def __init__(
        self,
        items: Any = (),
        *,
        type_name: str = "[]interface {}",
        stringer: Callable[[GoList], str] | None = None,
        marshal: Callable[[GoList], Any] | None = None,
        is_nil: bool = False,
    ) -> None:
        super().__init__(items)
        self.type_name = type_name
        self.stringer = stringer
        self.marshal = marshal
        self.is_nil = is_nil


def _type_name(v: Any) -> str:
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float64"
    if isinstance(v, str):
        return "string"
    if isinstance(v, GoStruct):
        return v.type_name
    if isinstance(v, (GoMap, GoList)):
        return v.type_name
    if isinstance(v, dict):
        return "map[string]interface {}"
    if isinstance(v, (list, tuple)):
        return "[]interface {}"
    return type(v).__name__


_KIND_INVALID, _KIND_BOOL, _KIND_INT, _KIND_FLOAT, _KIND_STRING, _KIND_OTHER = range(6)


def _kind(v: Any) -> int:
    if v is None:
        return _KIND_INVALID
    if isinstance(v, bool):
        return _KIND_BOOL
    if isinstance(v, int):
        return _KIND_INT
    if isinstance(v, float):
        return _KIND_FLOAT
    if isinstance(v, str):
        return _KIND_STRING
    return _KIND_OTHER


def is_true(v: Any) -> bool:
    """Go template truthiness: the zero value and empty containers are false."""
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True  # structs and pointers to structs


# --------------------------------------------------------------------------
# fmt and encoding/json formatting


def _shortest(f: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of |f| and the decimal point position
    (value = 0.DIGITS x 10**dp), as Go's strconv computes them."""
    d = Decimal(repr(abs(f)))
    _sign, digits_t, exp = d.as_tuple()
    assert isinstance(exp, int)
    digits = "".join(str(x) for x in digits_t).lstrip("0")
    if not digits:
        return "0", 1
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    return stripped, len(stripped) + exp


def _fmt_e(neg: bool, digits: str, dp: int, prec: int) -> str:
    mant = digits[0]
    rest = digits[1:]
    if prec > 0:
        mant += "." + (rest + "0" * prec)[:prec]
    exp = dp - 1 if digits != "0" else 0
    sign = "-" if exp < 0 else "+"
    return ("-" if neg else "") + mant + "e" + sign + f"{abs(exp):02d}"


def _fmt_f(neg: bool, digits: str, dp: int, prec: int) -> str:
    if dp <= 0:
        intpart = "0"
        frac = "0" * (-dp) + digits
    elif dp >= len(digits):
        intpart = digits + "0" * (dp - len(digits))
        frac = ""
    else:
        intpart, frac = digits[:dp], digits[dp:]
    if digits == "0":
        intpart, frac = "0", ""
    s = intpart
    if prec > 0:
        s += "." + (frac + "0" * prec)[:prec]
    return ("-" if neg else "") + s


def _float_g(f: float) -> str:
    """Go's ``%v`` for float64 (strconv 'g' with shortest precision)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    neg = math.copysign(1.0, f) < 0
    digits, dp = _shortest(f)
    exp = dp - 1
    # shortest precision: %e when the exponent is < -4 or >= 6 (strconv 'g', -1)
    if digits != "0" and (exp < -4 or exp >= 6):
        return _fmt_e(neg, digits, dp, len(digits) - 1)
    return _fmt_f(neg, digits, dp, max(len(digits) - dp, 0))


def _float_json(f: float) -> str:
    """encoding/json's float64 format."""
    if math.isnan(f) or math.isinf(f):
        raise _JSONError(f"json: unsupported value: {_float_g(f)}")
    neg = math.copysign(1.0, f) < 0 and f != 0
    digits, dp = _shortest(f)
    a = abs(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        s = _fmt_e(neg, digits, dp, len(digits) - 1)
        # Go trims a single leading zero of a negative exponent: e-07 -> e-7
        if len(s) >= 4 and s[-4] == "e" and s[-3] == "-" and s[-2] == "0":
            s = s[:-2] + s[-1]
        return s
    return _fmt_f(neg, digits, dp, max(len(digits) - dp, 0))


def _sprint_value(v: Any) -> str:
    """fmt's %v for one operand."""
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float_g_v(v)
    if isinstance(v, str):
        return v
    stringer = getattr(v, "stringer", None)
    if stringer is not None:
        return str(stringer(v))
    if isinstance(v, GoStruct):
        return "{" + " ".join(_sprint_value(x) for x in v.fields.values()) + "}"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{_sprint_value(k)}:{_sprint_value(v[k])}" for k in _sorted_keys(v)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_sprint_value(x) for x in v) + "]"
    return str(v)


def _float_g_v(f: float) -> str:
    # fmt's %v of a float64 is the shortest %g form.
    return _float_g(f)


def _sorted_keys(d: dict[Any, Any]) -> list[Any]:
    def key(k: Any) -> tuple[int, Any]:
        if isinstance(k, bool):
            return (0, int(k))
        if isinstance(k, (int, float)):
            return (1, k)
        return (2, str(k))

    return sorted(d.keys(), key=key)


def go_sprint(*args: Any) -> str:
    """fmt.Sprint: spaces between operands when neither side is a string."""
    out: list[str] = []
    prev_string = True
    for i, a in enumerate(args):
        is_string = isinstance(a, str)
        if i > 0 and not is_string and not prev_string:
            out.append(" ")
        out.append(_sprint_value(a))
        prev_string = is_string
    return "".join(out)


def go_sprintln(*args: Any) -> str:
    """fmt.Sprintln: spaces between all operands and a trailing newline."""
    return " ".join(_sprint_value(a) for a in args) + "\n"


def _go_quote(s: str) -> str:
    """strconv.Quote."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}[ch])
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


def _pad(s: str, width: int | None, minus: bool, zero: bool) -> str:
    if width is None or len(s) >= width:
        return s
    fill = width - len(s)
    if minus:
        return s + " " * fill
    if zero:
        sign = ""
        if s and s[0] in "+-":
            sign, s = s[0], s[1:]
        return sign + "0" * fill + s
    return " " * fill + s


def _bad_verb(verb: str, arg: Any) -> str:
    if arg is None:
        return f"%!{verb}(<nil>)"
    return f"%!{verb}({_type_name(arg)}={_sprint_value(arg)})"


def _format_one(verb: str, arg: Any, flags: str, width: int | None, prec: int | None) -> str:
    plus = "+" in flags
    space = " " in flags
    minus = "-" in flags
    zero = "0" in flags and not minus
    sharp = "#" in flags

    def num_sign(s: str, negative: bool) -> str:
        if negative:
            return s
        if plus:
            return "+" + s
        if space:
            return " " + s
        return s

    if verb == "T":
        return _pad(_type_name(arg), width, minus, False)
    if verb == "v":
        if isinstance(arg, float):
            s = num_sign(_float_g(arg), arg < 0 or math.copysign(1, arg) < 0)
            return _pad(s, width, minus, zero)
        if isinstance(arg, int) and not isinstance(arg, bool):
            return _pad(num_sign(str(arg), arg < 0), width, minus, zero)
        if isinstance(arg, str) and sharp:
            return _pad(_go_quote(arg), width, minus, False)
        return _pad(_sprint_value(arg), width, minus, False)
    if isinstance(arg, (GoStruct, GoMap, GoList)) and getattr(arg, "stringer", None) and verb in "sqxX":
        arg = arg.stringer(arg)  # type: ignore[misc, arg-type]
    if isinstance(arg, (list, tuple)) and not isinstance(arg, str) and verb in "dsqxXfFeEgGtc":
        inner = [_format_one(verb, x, flags.replace("-", ""), None, prec) for x in arg]
        return _pad("[" + " ".join(inner) + "]", width, minus, False)
    if verb in "sq":
        if not isinstance(arg, str):
            if verb == "q" and isinstance(arg, int) and not isinstance(arg, bool):
                return _pad("'" + _go_quote(chr(arg))[1:-1].replace("'", "\\'") + "'", width, minus, False)
            if isinstance(arg, (GoStruct, dict)) and verb == "s":
                return _pad(_sprint_value(arg), width, minus, False)
            return _bad_verb(verb, arg)
        s = arg if prec is None else arg[:prec]
        if verb == "q":
            s = _go_quote(s)
        return _pad(s, width, minus, zero)
    if verb in "dboxXc":
        if isinstance(arg, str) and verb in "xX":
            data = arg.encode("utf-8")
            if prec is not None:
                data = data[:prec]
            s = data.hex()
            return _pad(s.upper() if verb == "X" else s, width, minus, False)
        if not isinstance(arg, int) or isinstance(arg, bool):
            if isinstance(arg, float) and verb in "xX":
                return _bad_verb(verb, arg)
            return _bad_verb(verb, arg)
        if verb == "c":
            return _pad(chr(arg) if 0 <= arg <= 0x10FFFF else "\ufffd", width, minus, False)
        base = {"d": 10, "b": 2, "o": 8, "x": 16, "X": 16}[verb]
        mag = abs(arg)
        if base == 10:
            digits = str(mag)
        elif base == 2:
            digits = format(mag, "b")
        elif base == 8:
            digits = format(mag, "o")
        else:
            digits = format(mag, "x" if verb == "x" else "X")
        if prec is not None and len(digits) < prec:
            digits = "0" * (prec - len(digits)) + digits
        if sharp:
            digits = {2: "0b", 8: "0", 16: "0x" if verb == "x" else "0X", 10: ""}[base] + digits
        s = ("-" if arg < 0 else "") + digits
        return _pad(num_sign(s, arg < 0), width, minus, zero and prec is None)
    if verb in "fFeEgG":
        if not isinstance(arg, float):
            return _bad_verb(verb, arg)
        if math.isnan(arg) or math.isinf(arg):
            s = "NaN" if math.isnan(arg) else ("+Inf" if arg > 0 else "-Inf")
            if s == "+Inf" and not plus:
                s = "Inf"
            return _pad(s, width, minus, False)
        if verb in "gG" and prec is None:
            s = _float_g(arg)
            s = s.upper() if verb == "G" else s
        else:
            p = 6 if prec is None else prec
            pyverb = {"F": "f"}.get(verb, verb)
            s = format(arg, f".{p}{pyverb}")
        return _pad(num_sign(s, s.startswith("-")), width, minus, zero)
    if verb == "t":
        if not isinstance(arg, bool):
            return _bad_verb(verb, arg)
        return _pad("true" if arg else "false", width, minus, False)
    return _bad_verb(verb, arg)


_GO_FMT_MAX = 1_000_000  # fmt's tooLarge: widths and precisions beyond are refused


def _int_arg(args: tuple[Any, ...], i: int) -> bool:
    """fmt's intFromArg: a ``*`` width/precision must be an int within 1e6."""
    if i >= len(args):
        return False
    a = args[i]
    return isinstance(a, int) and not isinstance(a, bool) and -_GO_FMT_MAX <= a <= _GO_FMT_MAX


def _parsenum(fmt: str, i: int) -> tuple[int | None, int]:
    """fmt's parsenum: digits at ``i``; a number that overflows 1e6 consumes
    the rest of the format (Go then prints %!(NOVERB)), so no huge padding
    is ever allocated."""
    num, start = 0, i
    while i < len(fmt) and fmt[i].isdigit():
        if num > _GO_FMT_MAX:
            return None, len(fmt)
        num = num * 10 + int(fmt[i])
        i += 1
    return (num if i > start else None), i


def go_sprintf(fmt: str, *args: Any) -> str:
    """fmt.Sprintf for the verbs templates use (%s %d %v %q %f %x %t %c %e %g
    %T %%), with flags, width and precision (``*`` included)."""
    out: list[str] = []
    argi = 0
    i = 0
    n = len(fmt)
    budget = current()
    size = n
    while i < n:
        ch = fmt[i]
        if ch != "%":
            j = fmt.find("%", i)
            if j < 0:
                j = n
            out.append(fmt[i:j])
            i = j
            continue
        i += 1
        if i >= n:
            out.append("%!(NOVERB)")
            break
        flags = ""
        while i < n and fmt[i] in "+-# 0":
            flags += fmt[i]
            i += 1
        width: int | None = None
        prec: int | None = None
        if i < n and fmt[i] == "*":
            i += 1
            if _int_arg(args, argi):
                width = args[argi]
                if width < 0:
                    flags += "-"
                    width = -width
            else:
                out.append("%!(BADWIDTH)")
            argi += 1
        else:
            width, i = _parsenum(fmt, i)
        if i < n and fmt[i] == ".":
            i += 1
            if i < n and fmt[i] == "*":
                i += 1
                if _int_arg(args, argi):
                    prec = args[argi] if args[argi] >= 0 else None
                else:
                    out.append("%!(BADPREC)")
                argi += 1
            else:
                prec, i = _parsenum(fmt, i)
                prec = prec or 0
        if i >= n:
            out.append("%!(NOVERB)")
            break
        verb = fmt[i]
        i += 1
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        # %q and %x print a character as up to 12 (\U0010ffff, "f4 8f bf bf ")
        printed = budget.text_bound(args[argi], _expand)
        if verb in "qxX":
            budget.spend(printed)  # quoted or hex-encoded character by character
            printed *= PRINT_FACTOR
        size += (width or 0) + (prec or 0) + printed
        budget.allow(size, "printf")
        out.append(_format_one(verb, args[argi], flags, width, prec))
        argi += 1
    if argi < len(args):
        extra = ", ".join(
            "<nil>" if a is None else f"{_type_name(a)}={_sprint_value(a)}" for a in args[argi:]
        )
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


class _JSONError(Exception):
    pass


_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        short = _JSON_SHORT.get(ch)
        if short is not None:
            out.append(short)
        elif o < 0x20 or ch in "<>&":
            out.append(f"\\u00{o:02x}")
        elif o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_empty(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v == 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) == 0
    return False


def _json_encode(v: Any, out: list[str]) -> None:
    marshal = getattr(v, "marshal", None)
    if marshal is not None:
        _json_encode(marshal(v), out)
        return
    if v is None:
        out.append("null")
    elif isinstance(v, bool):
        out.append("true" if v else "false")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, float):
        out.append(_float_json(v))
    elif isinstance(v, str):
        out.append(_json_string(v))
    elif isinstance(v, GoStruct):
        out.append("{")
        first = True
        for name, value in v.fields.items():
            key, omitempty = v.json_tags.get(name, (name, False))
            if key == "-" or (omitempty and _json_empty(value)):
                continue
            if not first:
                out.append(",")
            first = False
            out.append(_json_string(key))
            out.append(":")
            _json_encode(value, out)
        out.append("}")
    elif isinstance(v, dict):
        if getattr(v, "is_nil", False):
            out.append("null")
            return
        out.append("{")
        keys = sorted(v.keys(), key=lambda k: _sprint_value(k))
        for i, k in enumerate(keys):
            if i:
                out.append(",")
            out.append(_json_string(k if isinstance(k, str) else _sprint_value(k)))
            out.append(":")
            _json_encode(v[k], out)
        out.append("}")
    elif isinstance(v, (list, tuple)):
        if getattr(v, "is_nil", False):
            out.append("null")
            return
        out.append("[")
        for i, x in enumerate(v):
            if i:
                out.append(",")
            _json_encode(x, out)
        out.append("]")
    else:
        raise _JSONError(f"json: unsupported type: {_type_name(v)}")


def go_json(v: Any) -> str:
    """encoding/json.Marshal: compact, map keys sorted, HTML characters escaped."""
    out: list[str] = []
    _json_encode(v, out)
    return "".join(out)


# --------------------------------------------------------------------------
# Lexer

_SPACE = " \t\r\n"
(
    T_TEXT,
    T_LEFT,
    T_RIGHT,
    T_SPACE,
    T_FIELD,
    T_VARIABLE,
    T_IDENT,
    T_KEYWORD,
    T_STRING,
    T_RAWSTRING,
    T_CHAR,
    T_NUMBER,
    T_BOOL,
    T_NIL,
    T_DOT,
    T_PIPE,
    T_ASSIGN,
    T_DECLARE,
    T_LPAREN,
    T_RPAREN,
    T_COMMA,
    T_EOF,
) = range(22)

_KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}

_TOKEN_NAMES = {
    T_TEXT: "text",
    T_LEFT: "left delim",
    T_RIGHT: "right delim",
    T_SPACE: "space",
    T_FIELD: "field",
    T_VARIABLE: "variable",
    T_IDENT: "identifier",
    T_KEYWORD: "keyword",
    T_STRING: "string",
    T_RAWSTRING: "raw string",
    T_CHAR: "character constant",
    T_NUMBER: "number",
    T_BOOL: "bool",
    T_NIL: "nil",
    T_DOT: "dot",
    T_PIPE: "pipe",
    T_ASSIGN: "=",
    T_DECLARE: ":=",
    T_LPAREN: "(",
    T_RPAREN: ")",
    T_COMMA: ",",
    T_EOF: "EOF",
}


@dataclass
class _Tok:
    typ: int
    val: str
    line: int

    def describe(self) -> str:
        if self.typ == T_EOF:
            return "EOF"
        if self.typ in (T_KEYWORD,):
            return f"<{self.val}>"
        if self.typ == T_RIGHT:
            return '"}}"'
        if self.typ == T_LEFT:
            return '"{{"'
        return f"{_TOKEN_NAMES[self.typ]} {self.val!r}"


def _is_alnum(c: str) -> bool:
    return c == "_" or c.isalnum()


def _parse_error(line: int, msg: str) -> TemplateError:
    return TemplateError(f"template line {line}: {msg}")


def _lex(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    n = len(src)
    pos = 0
    line = 1

    def at_right_delim(p: int) -> tuple[bool, bool]:
        if p + 1 < n and src[p] in _SPACE and src[p + 1] == "-" and src.startswith("}}", p + 2):
            return True, True
        if src.startswith("}}", p):
            return True, False
        return False, False

    def skip_space(p: int) -> int:
        nonlocal line
        while p < n and src[p] in _SPACE:
            if src[p] == "\n":
                line += 1
            p += 1
        return p

    while True:
        i = src.find("{{", pos)
        if i < 0:
            if pos < n:
                toks.append(_Tok(T_TEXT, src[pos:], line))
                line += src.count("\n", pos)
            break
        trim_left = i + 3 < n and src[i + 2] == "-" and src[i + 3] in _SPACE
        text = src[pos:i]
        if trim_left:
            text = text.rstrip(_SPACE)
        if text:
            toks.append(_Tok(T_TEXT, text, line))
        line += src.count("\n", pos, i)
        action_line = line
        p = i + 2 + (2 if trim_left else 0)
        if trim_left:
            line += src.count("\n", i, p)
        # comment
        if src.startswith("/*", p):
            end = src.find("*/", p + 2)
            if end < 0:
                raise _parse_error(action_line, "unclosed comment")
            q = end + 2
            delim, trim_right = at_right_delim(q)
            if not delim:
                raise _parse_error(action_line, "comment ends before closing delimiter")
            q += 4 if trim_right else 2
            line += src.count("\n", p, q)
            pos = skip_space(q) if trim_right else q
            continue
        toks.append(_Tok(T_LEFT, "{{", action_line))
        paren = 0
        while True:
            if p >= n:
                raise _parse_error(action_line, "unclosed action")
            delim, trim_right = at_right_delim(p)
            if delim:
                if paren:
                    raise _parse_error(line, "unclosed left paren")
                toks.append(_Tok(T_RIGHT, "}}", line))
                if trim_right:
                    if src[p] == "\n":
                        line += 1
                    p += 4
                    p = skip_space(p)
                else:
                    p += 2
                pos = p
                break
            c = src[p]
            if c in _SPACE:
                start = p
                while p < n and src[p] in _SPACE:
                    # stop before a space that starts a " -}}" delimiter
                    if p + 1 < n and src[p + 1] == "-" and src.startswith("}}", p + 2):
                        break
                    if src[p] == "\n":
                        line += 1
                    p += 1
                if p > start:
                    toks.append(_Tok(T_SPACE, src[start:p], line))
                continue
            if c == "=":
                toks.append(_Tok(T_ASSIGN, "=", line))
                p += 1
            elif c == ":":
                if not src.startswith(":=", p):
                    raise _parse_error(line, "expected :=")
                toks.append(_Tok(T_DECLARE, ":=", line))
                p += 2
            elif c == "|":
                toks.append(_Tok(T_PIPE, "|", line))
                p += 1
            elif c == ",":
                toks.append(_Tok(T_COMMA, ",", line))
                p += 1
            elif c == "(":
                paren += 1
                toks.append(_Tok(T_LPAREN, "(", line))
                p += 1
            elif c == ")":
                paren -= 1
                if paren < 0:
                    raise _parse_error(line, "unexpected right paren")
                toks.append(_Tok(T_RPAREN, ")", line))
                p += 1
            elif c == '"':
                q = p + 1
                while True:
                    if q >= n or src[q] == "\n":
                        raise _parse_error(line, "unterminated quoted string")
                    if src[q] == "\\":
                        q += 2
                        continue
                    if src[q] == '"':
                        break
                    q += 1
                toks.append(_Tok(T_STRING, src[p : q + 1], line))
                p = q + 1
            elif c == "`":
                q = src.find("`", p + 1)
                if q < 0:
                    raise _parse_error(line, "unterminated raw quoted string")
                toks.append(_Tok(T_RAWSTRING, src[p : q + 1], line))
                line += src.count("\n", p, q)
                p = q + 1
            elif c == "'":
                q = p + 1
                while True:
                    if q >= n or src[q] == "\n":
                        raise _parse_error(line, "unterminated character constant")
                    if src[q] == "\\":
                        q += 2
                        continue
                    if src[q] == "'":
                        break
                    q += 1
                toks.append(_Tok(T_CHAR, src[p : q + 1], line))
                p = q + 1
            elif c == "$" or (c == "." and not (p + 1 < n and src[p + 1].isdigit())):
                q = p + 1
                while q < n and _is_alnum(src[q]):
                    q += 1
                word = src[p:q]
                if word == ".":
                    toks.append(_Tok(T_DOT, ".", line))
                elif c == "$":
                    toks.append(_Tok(T_VARIABLE, word, line))
                else:
                    toks.append(_Tok(T_FIELD, word, line))
                p = q
                _check_terminator(src, p, line)
            elif c.isdigit() or c in "+-." :
                q = _scan_number(src, p)
                if q == p or (q < n and _is_alnum(src[q])):
                    end = q
                    while end < n and _is_alnum(src[end]):
                        end += 1
                    raise _parse_error(line, f"bad number syntax: {src[p:max(end, p + 1)]!r}")
                toks.append(_Tok(T_NUMBER, src[p:q], line))
                p = q
            elif _is_alnum(c):
                q = p
                while q < n and _is_alnum(src[q]):
                    q += 1
                word = src[p:q]
                if word in _KEYWORDS:
                    toks.append(_Tok(T_KEYWORD, word, line))
                elif word in ("true", "false"):
                    toks.append(_Tok(T_BOOL, word, line))
                elif word == "nil":
                    toks.append(_Tok(T_NIL, word, line))
                else:
                    toks.append(_Tok(T_IDENT, word, line))
                p = q
                _check_terminator(src, p, line)
            else:
                raise _parse_error(line, f"unrecognized character in action: {c!r}")
    toks.append(_Tok(T_EOF, "", line))
    return toks


def _check_terminator(src: str, p: int, line: int) -> None:
    if p >= len(src):
        return
    c = src[p]
    if c in _SPACE or c in ".,|:()" or src.startswith("}}", p):
        return
    raise _parse_error(line, f"bad character {c!r}")


def _scan_number(src: str, p: int) -> int:
    n = len(src)
    q = p
    if q < n and src[q] in "+-":
        q += 1
    digits = "0123456789_"
    if src.startswith(("0x", "0X"), q):
        q += 2
        digits = "0123456789abcdefABCDEF_"
    elif src.startswith(("0b", "0B"), q):
        q += 2
        digits = "01_"
    elif src.startswith(("0o", "0O"), q):
        q += 2
        digits = "01234567_"
    start = q
    while q < n and src[q] in digits:
        q += 1
    decimal = digits == "0123456789_"
    if q < n and src[q] == "." and decimal:
        q += 1
        while q < n and src[q] in digits:
            q += 1
    if q == start or (q == start + 1 and src[start] == "."):
        return p
    if q < n and src[q] in "eE" and decimal:
        r = q + 1
        if r < n and src[r] in "+-":
            r += 1
        s = r
        while r < n and src[r].isdigit():
            r += 1
        if r > s:
            q = r
    if q < n and src[q] == "i":
        q += 1
    return q


# --------------------------------------------------------------------------
# Parse tree


@dataclass
class Node:
    line: int


@dataclass
class ListNode(Node):
    nodes: list[Node] = field(default_factory=list)


@dataclass
class TextNode(Node):
    text: str = ""


@dataclass
class CommandNode(Node):
    args: list[Node] = field(default_factory=list)


@dataclass
class PipeNode(Node):
    decl: list[str] = field(default_factory=list)
    is_assign: bool = False
    cmds: list[CommandNode] = field(default_factory=list)


@dataclass
class ActionNode(Node):
    pipe: PipeNode = field(default_factory=lambda: PipeNode(0))


@dataclass
class FieldNode(Node):
    idents: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "." + ".".join(self.idents)


@dataclass
class VariableNode(Node):
    idents: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return ".".join(self.idents)


@dataclass
class ChainNode(Node):
    node: Node = field(default_factory=lambda: Node(0))
    fields: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"({_node_str(self.node)})." + ".".join(self.fields)


@dataclass
class IdentifierNode(Node):
    name: str = ""


@dataclass
class DotNode(Node):
    pass


@dataclass
class NilNode(Node):
    pass


@dataclass
class BoolNode(Node):
    value: bool = False


@dataclass
class NumberNode(Node):
    value: Any = 0
    text: str = ""


@dataclass
class StringNode(Node):
    value: str = ""
    quoted: str = ""


@dataclass
class BranchNode(Node):
    pipe: PipeNode = field(default_factory=lambda: PipeNode(0))
    list: ListNode = field(default_factory=lambda: ListNode(0))
    else_list: ListNode | None = None


@dataclass
class IfNode(BranchNode):
    pass


@dataclass
class RangeNode(BranchNode):
    pass


@dataclass
class WithNode(BranchNode):
    pass


@dataclass
class BreakNode(Node):
    pass


@dataclass
class ContinueNode(Node):
    pass


@dataclass
class TemplateCallNode(Node):
    name: str = ""
    pipe: PipeNode | None = None


@dataclass
class _EndNode(Node):
    pass


@dataclass
class _ElseNode(Node):
    pass


def _node_str(n: Node) -> str:
    if isinstance(n, (FieldNode, VariableNode, ChainNode)):
        return str(n)
    if isinstance(n, IdentifierNode):
        return n.name
    if isinstance(n, DotNode):
        return "."
    if isinstance(n, NilNode):
        return "nil"
    if isinstance(n, BoolNode):
        return "true" if n.value else "false"
    if isinstance(n, NumberNode):
        return n.text
    if isinstance(n, StringNode):
        return n.quoted
    if isinstance(n, PipeNode):
        decl = ""
        if n.decl:
            decl = ", ".join(n.decl) + (" = " if n.is_assign else " := ")
        return decl + " | ".join(" ".join(_node_str(a) for a in c.args) for c in n.cmds)
    if isinstance(n, CommandNode):
        return " ".join(_node_str(a) for a in n.args)
    return type(n).__name__


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", "'": "'", '"': '"'}


def _unquote(s: str, line: int) -> str:
    """strconv.Unquote for a double-quoted or single-quoted Go literal."""
    body = s[1:-1]
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            raise _parse_error(line, f"invalid syntax in {s}")
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            hexs = body[i + 2 : i + 2 + width]
            if len(hexs) != width or any(h not in "0123456789abcdefABCDEF" for h in hexs):
                raise _parse_error(line, f"invalid syntax in {s}")
            cp = int(hexs, 16)
            if e == "x":
                out.append(chr(cp))  # a byte; close enough for templates
            else:
                if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                    raise _parse_error(line, f"invalid syntax in {s}")
                out.append(chr(cp))
            i += 2 + width
        elif e in "01234567":
            octs = body[i + 1 : i + 4]
            if len(octs) != 3 or any(o not in "01234567" for o in octs) or int(octs, 8) > 255:
                raise _parse_error(line, f"invalid syntax in {s}")
            out.append(chr(int(octs, 8)))
            i += 4
        else:
            raise _parse_error(line, f"invalid syntax in {s}")
    return "".join(out)


def _parse_number(text: str, line: int) -> Any:
    t = text.replace("_", "")
    if t.endswith("i"):
        raise _parse_error(line, f"complex numbers are not supported: {text}")
    neg = t.startswith("-")
    body = t.lstrip("+-")
    try:
        if body[:2].lower() == "0x":
            v: Any = int(body[2:], 16)
        elif body[:2].lower() == "0b":
            v = int(body[2:], 2)
        elif body[:2].lower() == "0o":
            v = int(body[2:], 8)
        elif any(c in body for c in ".eE"):
            # Go gives float64 to a constant spelled with '.', 'e' or 'E'
            v = float(body)
        elif len(body) > 1 and body[0] == "0":
            v = int(body, 8)
        else:
            v = int(body)
    except ValueError:
        raise _parse_error(line, f"bad number syntax: {text!r}") from None
    return -v if neg else v


class _Parser:
    def __init__(self, src: str, funcs: Mapping[str, Any]) -> None:
        self.toks = _lex(src)
        self.i = 0
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.range_depth = 0
        self.templates: dict[str, ListNode] = {}

    # token helpers
    def next(self) -> _Tok:
        t = self.toks[self.i]
        if t.typ != T_EOF:
            self.i += 1
        return t

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def backup(self, k: int = 1) -> None:
        self.i -= k

    def next_non_space(self) -> _Tok:
        t = self.next()
        while t.typ == T_SPACE:
            t = self.next()
        return t

    def peek_non_space(self) -> _Tok:
        j = self.i
        while self.toks[j].typ == T_SPACE:
            j += 1
        return self.toks[j]

    def error(self, tok: _Tok | int, msg: str) -> TemplateError:
        line = tok if isinstance(tok, int) else tok.line
        return _parse_error(line, msg)

    def unexpected(self, tok: _Tok, context: str) -> TemplateError:
        if tok.typ == T_EOF:
            return self.error(tok, f"unexpected EOF in {context}")
        return self.error(tok, f"unexpected {tok.describe()} in {context}")

    def expect(self, typ: int, context: str) -> _Tok:
        t = self.next_non_space()
        if t.typ != typ:
            raise self.unexpected(t, context)
        return t

    # grammar
    def parse(self) -> ListNode:
        root = ListNode(1)
        while self.peek().typ != T_EOF:
            if self.peek().typ == T_LEFT:
                j = self.i + 1
                while self.toks[j].typ == T_SPACE:
                    j += 1
                if self.toks[j].typ == T_KEYWORD and self.toks[j].val == "define":
                    self.next()
                    self.next_non_space()
                    self.parse_definition()
                    continue
            n = self.text_or_action()
            if isinstance(n, (_EndNode, _ElseNode)):
                raise self.error(n.line, f"unexpected {{{{{'end' if isinstance(n, _EndNode) else 'else'}}}}}")
            if n is not None:
                root.nodes.append(n)
        return root

    def parse_definition(self) -> None:
        tok = self.next_non_space()
        if tok.typ not in (T_STRING, T_RAWSTRING):
            raise self.unexpected(tok, "define clause")
        name = _unquote(tok.val, tok.line) if tok.typ == T_STRING else tok.val[1:-1]
        self.expect(T_RIGHT, "define clause")
        body, end = self.item_list()
        if not isinstance(end, _EndNode):
            raise self.error(end.line, "unexpected {{else}} in define clause")
        self.templates[name] = body

    def item_list(self) -> tuple[ListNode, Node]:
        lst = ListNode(self.peek().line)
        while self.peek_non_space().typ != T_EOF:
            n = self.text_or_action()
            if isinstance(n, (_EndNode, _ElseNode)):
                return lst, n
            if n is not None:
                lst.nodes.append(n)
        raise self.error(self.peek(), "unexpected EOF")

    def text_or_action(self) -> Node | None:
        t = self.next_non_space()
        if t.typ == T_TEXT:
            return TextNode(t.line, t.val)
        if t.typ == T_LEFT:
            return self.action()
        raise self.unexpected(t, "input")

    def action(self) -> Node:
        t = self.next_non_space()
        if t.typ == T_KEYWORD:
            kw = t.val
            if kw == "block":
                return self.block_control(t)
            if kw == "break":
                return self.break_continue(t, BreakNode)
            if kw == "continue":
                return self.break_continue(t, ContinueNode)
            if kw == "else":
                return self.else_control(t)
            if kw == "end":
                self.expect(T_RIGHT, "end")
                return _EndNode(t.line)
            if kw == "if":
                return self.parse_control(IfNode, "if", t.line)
            if kw == "range":
                return self.parse_control(RangeNode, "range", t.line)
            if kw == "with":
                return self.parse_control(WithNode, "with", t.line)
            if kw == "template":
                return self.template_control(t)
            if kw == "define":
                raise self.error(t, "unexpected <define> in command")
        self.backup()
        line = self.peek().line
        return ActionNode(line, self.pipeline("command", T_RIGHT))

    def break_continue(self, t: _Tok, cls: type[Node]) -> Node:
        tok = self.next_non_space()
        if tok.typ != T_RIGHT:
            raise self.unexpected(tok, f"{{{{{t.val}}}}}")
        if self.range_depth == 0:
            raise self.error(t, f"{{{{{t.val}}}}} outside {{{{range}}}}")
        return cls(t.line)

    def else_control(self, t: _Tok) -> Node:
        peek = self.peek_non_space()
        if peek.typ == T_KEYWORD and peek.val in ("if", "with"):
            return _ElseNode(t.line)  # "else if"/"else with": leave the keyword pending
        self.expect(T_RIGHT, "else")
        return _ElseNode(t.line)

    def parse_control(self, cls: type[BranchNode], context: str, line: int) -> BranchNode:
        nvars = len(self.vars)
        try:
            pipe = self.pipeline(context, T_RIGHT)
            if context == "range":
                self.range_depth += 1
            body, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list: ListNode | None = None
            if isinstance(nxt, _ElseNode):
                peek = self.peek_non_space()
                if context == "if" and peek.typ == T_KEYWORD and peek.val == "if":
                    self.next_non_space()
                    else_list = ListNode(nxt.line, [self.parse_control(IfNode, "if", peek.line)])
                elif context == "with" and peek.typ == T_KEYWORD and peek.val == "with":
                    self.next_non_space()
                    else_list = ListNode(nxt.line, [self.parse_control(WithNode, "with", peek.line)])
                else:
                    else_list, nxt2 = self.item_list()
                    if not isinstance(nxt2, _EndNode):
                        raise self.error(nxt2.line, "expected end; found {{else}}")
            return cls(line, pipe, body, else_list)
        finally:
            del self.vars[nvars:]

    def block_control(self, t: _Tok) -> Node:
        tok = self.next_non_space()
        if tok.typ not in (T_STRING, T_RAWSTRING):
            raise self.unexpected(tok, "block clause")
        name = _unquote(tok.val, tok.line) if tok.typ == T_STRING else tok.val[1:-1]
        pipe = self.pipeline("block clause", T_RIGHT)
        saved_vars = self.vars
        self.vars = ["$"]
        body, end = self.item_list()
        self.vars = saved_vars
        if not isinstance(end, _EndNode):
            raise self.error(end.line, "unexpected {{else}} in block clause")
        self.templates[name] = body
        return TemplateCallNode(t.line, name, pipe)

    def template_control(self, t: _Tok) -> Node:
        tok = self.next_non_space()
        if tok.typ not in (T_STRING, T_RAWSTRING):
            raise self.unexpected(tok, "template clause")
        name = _unquote(tok.val, tok.line) if tok.typ == T_STRING else tok.val[1:-1]
        pipe: PipeNode | None = None
        if self.peek_non_space().typ != T_RIGHT:
            pipe = self.pipeline("template clause", T_RIGHT)
        else:
            self.next_non_space()
        return TemplateCallNode(t.line, name, pipe)

    def pipeline(self, context: str, end: int) -> PipeNode:
        pipe = PipeNode(self.peek_non_space().line)
        # declarations
        while True:
            v = self.peek_non_space()
            if v.typ != T_VARIABLE:
                break
            save = self.i
            self.next_non_space()
            nxt = self.peek_non_space()
            if nxt.typ in (T_ASSIGN, T_DECLARE):
                self.next_non_space()
                pipe.is_assign = nxt.typ == T_ASSIGN
                if pipe.is_assign and v.val not in self.vars:
                    raise self.error(v, f"undefined variable \"{v.val}\"")
                pipe.decl.append(v.val)
                self.vars.append(v.val)
                break
            if nxt.typ == T_COMMA:
                self.next_non_space()
                pipe.decl.append(v.val)
                self.vars.append(v.val)
                if context == "range" and len(pipe.decl) < 2:
                    if self.peek_non_space().typ == T_VARIABLE:
                        continue
                    raise self.error(v, "range can only initialize variables")
                raise self.error(v, f"too many declarations in {context}")
            self.i = save
            break
        while True:
            t = self.next_non_space()
            if t.typ == end:
                self.check_pipeline(pipe, context, t)
                return pipe
            if t.typ in (
                T_BOOL,
                T_CHAR,
                T_DOT,
                T_FIELD,
                T_IDENT,
                T_NUMBER,
                T_NIL,
                T_RAWSTRING,
                T_STRING,
                T_VARIABLE,
                T_LPAREN,
            ):
                self.backup()
                pipe.cmds.append(self.command())
            else:
                raise self.unexpected(t, context)

    def check_pipeline(self, pipe: PipeNode, context: str, tok: _Tok) -> None:
        if not pipe.cmds:
            raise self.error(tok, f"missing value for {context}")
        for i, c in enumerate(pipe.cmds[1:], start=1):
            first = c.args[0]
            if isinstance(first, (BoolNode, DotNode, NilNode, NumberNode, StringNode)):
                raise self.error(first.line, f"non executable command in pipeline stage {i + 1}")

    def command(self) -> CommandNode:
        cmd = CommandNode(self.peek_non_space().line)
        while True:
            self.peek_non_space()
            op = self.operand()
            if op is not None:
                cmd.args.append(op)
            t = self.next()
            if t.typ == T_SPACE:
                continue
            if t.typ in (T_RIGHT, T_RPAREN):
                self.backup()
            elif t.typ == T_PIPE:
                pass
            else:
                raise self.unexpected(t, "operand")
            break
        if not cmd.args:
            raise self.error(cmd.line, "empty command")
        return cmd

    def operand(self) -> Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ == T_FIELD:
            fields: list[str] = []
            while self.peek().typ == T_FIELD:
                fields.append(self.next().val[1:])
            if isinstance(node, FieldNode):
                return FieldNode(node.line, node.idents + fields)
            if isinstance(node, VariableNode):
                return VariableNode(node.line, node.idents + fields)
            if isinstance(node, (BoolNode, StringNode, NumberNode, NilNode, DotNode)):
                raise self.error(node.line, f"unexpected . after term {_node_str(node)!r}")
            return ChainNode(node.line, node, fields)
        return node

    def term(self) -> Node | None:
        t = self.next_non_space()
        if t.typ == T_IDENT:
            if t.val not in self.funcs:
                raise self.error(t, f'function "{t.val}" not defined')
            return IdentifierNode(t.line, t.val)
        if t.typ == T_DOT:
            return DotNode(t.line)
        if t.typ == T_NIL:
            return NilNode(t.line)
        if t.typ == T_VARIABLE:
            name = t.val
            if name not in self.vars:
                raise self.error(t, f"undefined variable \"{name}\"")
            return VariableNode(t.line, [name])
        if t.typ == T_FIELD:
            return FieldNode(t.line, [t.val[1:]])
        if t.typ == T_BOOL:
            return BoolNode(t.line, t.val == "true")
        if t.typ == T_NUMBER:
            return NumberNode(t.line, _parse_number(t.val, t.line), t.val)
        if t.typ == T_CHAR:
            s = _unquote(t.val, t.line)
            if len(s) != 1:
                raise self.error(t, f"malformed character constant: {t.val}")
            return NumberNode(t.line, ord(s), t.val)
        if t.typ == T_LPAREN:
            return self.pipeline("parenthesized pipeline", T_RPAREN)
        if t.typ == T_STRING:
            return StringNode(t.line, _unquote(t.val, t.line), t.val)
        if t.typ == T_RAWSTRING:
            return StringNode(t.line, t.val[1:-1], t.val)
        self.backup()
        return None


# --------------------------------------------------------------------------
# Execution


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _FuncError(Exception):
    pass


_MISSING = object()


def _expand(value: Any) -> Any:
    """What a struct prints: its fields (for Budget.measure)."""
    return value.fields if isinstance(value, GoStruct) else None


def _args_text(b: Budget, args: list[Any]) -> int:
    return sum(b.text_bound(a, _expand) + 1 for a in args)


def _json_bound(b: Budget, args: list[Any]) -> int:
    size = b.measure(args[0], _expand)
    b.spend(size.chars)  # encoded character by character in Python
    return 6 * size.chars + 6 * size.items  # \u003c; quotes, colon and comma per entry


def _printed_bound(factor: int, per_char: bool) -> Callable[[Budget, list[Any]], int]:
    def bound(b: Budget, args: list[Any]) -> int:
        text = _args_text(b, args)
        if per_char:
            b.spend(text)
        return factor * text

    return bound


def _read_bound(b: Budget, args: list[Any]) -> int:
    """Functions that return (part of) what they are given, after reading
    it: len and index encode a string to UTF-8, slice copies, eq compares."""
    return sum(b.read(a) for a in args)


# Upper bounds on what a function returns, computed (and charged) before it
# runs; printf checks each piece itself (go_sprintf).
_FUNC_BOUNDS: dict[str, Callable[[Budget, list[Any]], int]] = {
    "print": _printed_bound(1, per_char=False),
    "println": _printed_bound(1, per_char=False),
    "html": _printed_bound(6, per_char=False),  # &#34;
    "js": _printed_bound(6, per_char=True),  # \u003C
    "urlquery": _printed_bound(12, per_char=True),  # %F0%9F%98%80
    "json": _json_bound,
}


def _len(item: Any) -> int:
    if item is None:
        raise _FuncError("len of nil pointer")
    if isinstance(item, str):
        return len(item.encode("utf-8", "surrogatepass"))
    if isinstance(item, (list, tuple, dict)):
        return len(item)
    raise _FuncError(f"len of type {_type_name(item)}")


def _index_arg(index: Any, cap: int, exclusive: bool) -> int:
    if index is None:
        raise _FuncError("cannot index slice/array with nil")
    if not isinstance(index, int) or isinstance(index, bool):
        raise _FuncError(f"cannot index slice/array with type {_type_name(index)}")
    if index < 0 or index > cap or (exclusive and index == cap):
        raise _FuncError(f"index out of range: {index}")
    return index


def _index(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise _FuncError("index of untyped nil")
    for idx in indexes:
        if item is None:
            raise _FuncError("index of nil pointer")
        if isinstance(item, str):
            data = item.encode("utf-8", "surrogatepass")
            item = data[_index_arg(idx, len(data), True)]
        elif isinstance(item, (list, tuple)):
            item = item[_index_arg(idx, len(item), True)]
        elif isinstance(item, dict):
            if not isinstance(idx, str) and all(isinstance(k, str) for k in item):
                raise _FuncError(f"value has type {_type_name(idx)}; should be string")
            item = item.get(idx)
        else:
            raise _FuncError(f"can't index item of type {_type_name(item)}")
    return item


def _slice(item: Any, *indexes: Any) -> Any:
    if item is None:
        raise _FuncError("slice of untyped nil")
    if len(indexes) > 3:
        raise _FuncError(f"too many slice indexes: {len(indexes)}")
    if isinstance(item, str):
        if len(indexes) == 3:
            raise _FuncError("cannot 3-index slice a string")
        data = item.encode("utf-8", "surrogatepass")
        length = len(data)
    elif isinstance(item, (list, tuple)):
        length = len(item)
    else:
        raise _FuncError(f"can't slice item of type {_type_name(item)}")
    idx = [0, length, length]
    for i, x in enumerate(indexes):
        idx[i] = _index_arg(x, length, False)
    if idx[0] > idx[1]:
        raise _FuncError(f"invalid slice index: {idx[0]} > {idx[1]}")
    if len(indexes) == 3 and idx[1] > idx[2]:
        raise _FuncError(f"invalid slice index: {idx[1]} > {idx[2]}")
    if isinstance(item, str):
        return data[idx[0] : idx[1]].decode("utf-8", "replace")
    sliced = item[idx[0] : idx[1]]
    if isinstance(item, GoList):
        return GoList(sliced, type_name=item.type_name, stringer=item.stringer, marshal=item.marshal)
    return list(sliced)


def _basic_kind_error() -> _FuncError:
    return _FuncError("incompatible types for comparison")


def _eq(arg1: Any, *args: Any) -> bool:
    if not args:
        raise _FuncError("missing argument for comparison")
    k1 = _kind(arg1)
    for arg in args:
        k2 = _kind(arg)
        if k1 != k2:
            if arg1 is not None and arg is not None:
                raise _basic_kind_error()
            continue
        if k1 == _KIND_OTHER:
            if isinstance(arg1, (list, tuple, dict)) or isinstance(arg, (list, tuple, dict)):
                raise _FuncError(
                    f"non-comparable types {_sprint_value(arg1)}: {_type_name(arg1)}, {_type_name(arg)}: {_sprint_value(arg)}"
                )
            if arg1 is arg:
                return True
            continue
        if k1 == _KIND_INVALID or arg1 == arg:
            return True
    return False


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _lt(a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        raise _basic_kind_error()
    if ka in (_KIND_BOOL, _KIND_OTHER, _KIND_INVALID):
        raise _FuncError("invalid type for comparison")
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    return _lt(a, b) or _eq(a, b)


def _gt(a: Any, b: Any) -> bool:
    return not _le(a, b)


def _ge(a: Any, b: Any) -> bool:
    return not _lt(a, b)


def _not(a: Any) -> bool:
    return not is_true(a)


def _eval_args_string(args: tuple[Any, ...]) -> str:
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return go_sprint(*args)


def _html(*args: Any) -> str:
    s = _eval_args_string(args)
    return (
        s.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("\x00", "\ufffd")
    )


def _js(*args: Any) -> str:
    s = _eval_args_string(args)
    out: list[str] = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == '"':
            out.append('\\"')
        elif ch in "<>&=":
            out.append(f"\\u{ord(ch):04X}")
        elif ord(ch) < 0x20 or not ch.isprintable():
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return "".join(out)


def _urlquery(*args: Any) -> str:
    return urllib.parse.quote_plus(_eval_args_string(args), safe="")


def _printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise _FuncError(f"wrong type for value; expected string; got {_type_name(fmt)}")
    return go_sprintf(fmt, *args)


def _json_func(v: Any) -> str:
    try:
        return go_json(v)
    except _JSONError:
        return ""


def _current_date(*_args: Any) -> str:
    return _dt.date.today().strftime("%Y-%m-%d")


def _yesterday_date(*_args: Any) -> str:
    return (_dt.date.today() - _dt.timedelta(days=1)).strftime("%Y-%m-%d")


def _call(*_args: Any) -> Any:
    raise _FuncError("call of nil: templates cannot call functions stored in data")


# name -> (callable, minimum number of args, maximum or None for variadic)
BUILTINS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "and": (lambda *a: a[-1], 1, None),
    "or": (lambda *a: a[-1], 1, None),
    "not": (_not, 1, 1),
    "len": (_len, 1, 1),
    "index": (_index, 1, None),
    "slice": (_slice, 1, None),
    "eq": (_eq, 1, None),
    "ne": (_ne, 2, 2),
    "lt": (_lt, 2, 2),
    "le": (_le, 2, 2),
    "gt": (_gt, 2, 2),
    "ge": (_ge, 2, 2),
    "print": (go_sprint, 0, None),
    "printf": (_printf, 1, None),
    "println": (go_sprintln, 0, None),
    "html": (_html, 0, None),
    "js": (_js, 0, None),
    "urlquery": (_urlquery, 0, None),
    "call": (_call, 1, None),
    # Ollama's additions
    "json": (_json_func, 1, 1),
    "currentDate": (_current_date, 0, None),
    "yesterdayDate": (_yesterday_date, 0, None),
}


class _Exec:
    def __init__(
        self,
        tmpl: GoTemplate,
        data: Any,
        funcs: dict[str, tuple[Callable[..., Any], int, int | None]],
        budget: Budget,
    ) -> None:
        self.tmpl = tmpl
        self.funcs = funcs
        self.vars: list[list[Any]] = [["$", data]]
        self.out: list[str] = []
        self.size = 0
        self.budget = budget
        self.node: Node | None = None
        self.depth = 0

    def error(self, msg: str) -> TemplateError:
        node = self.node
        if node is None:
            return TemplateError(f"template: {msg}")
        where = _node_str(node) if not isinstance(node, (ActionNode, BranchNode, TextNode, ListNode)) else ""
        at = f" at <{where}>" if where else ""
        return TemplateError(f"template line {node.line}: executing{at}: {msg}")

    def write(self, s: str) -> None:
        self.size += len(s)
        self.budget.allow(self.size, "the output")
        self.budget.allocate(s, "the output")
        self.out.append(s)

    # variables
    def var(self, name: str) -> Any:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                return self.vars[i][1]
        raise self.error(f"undefined variable: {name}")

    def set_var(self, name: str, value: Any) -> None:
        for i in range(len(self.vars) - 1, -1, -1):
            if self.vars[i][0] == name:
                self.vars[i][1] = value
                return
        raise self.error(f"undefined variable: {name}")

    # walking
    def walk(self, dot: Any, node: Node) -> None:
        self.node = node
        self.budget.spend(2)  # a step of the tree walk
        if isinstance(node, TextNode):
            self.write(node.text)
        elif isinstance(node, ListNode):
            for n in node.nodes:
                self.walk(dot, n)
        elif isinstance(node, ActionNode):
            val = self.eval_pipeline(dot, node.pipe)
            if not node.pipe.decl:
                self.node = node
                self.budget.allow(self.budget.text_bound(val, _expand), "printing a value")
                self.write(self.print_value(val))
        elif isinstance(node, IfNode) or isinstance(node, WithNode):
            mark = len(self.vars)
            try:
                val = self.eval_pipeline(dot, node.pipe)
                if is_true(val):
                    self.walk(val if isinstance(node, WithNode) else dot, node.list)
                elif node.else_list is not None:
                    self.walk(dot, node.else_list)
            finally:
                del self.vars[mark:]
        elif isinstance(node, RangeNode):
            self.walk_range(dot, node)
        elif isinstance(node, BreakNode):
            raise _Break()
        elif isinstance(node, ContinueNode):
            raise _Continue()
        elif isinstance(node, TemplateCallNode):
            body = self.tmpl.templates.get(node.name)
            if body is None:
                raise self.error(f'no such template "{node.name}"')
            new_dot = self.eval_pipeline(dot, node.pipe) if node.pipe is not None else None
            self.depth += 1
            if self.depth > 100:
                raise self.error("exceeded maximum template depth (100)")
            saved = self.vars
            self.vars = [["$", new_dot]]
            try:
                self.walk(new_dot, body)
            finally:
                self.vars = saved
                self.depth -= 1
        else:
            raise self.error(f"unknown node: {type(node).__name__}")

    def walk_range(self, dot: Any, node: RangeNode) -> None:
        mark = len(self.vars)
        try:
            val = self.eval_pipeline(dot, node.pipe)
            self.node = node
            items: Any
            if val is None:
                items = []
            elif isinstance(val, (list, tuple)):
                self.budget.spend(len(val))
                items = list(enumerate(val))
            elif isinstance(val, dict):
                self.budget.spend(len(val))
                items = [(k, val[k]) for k in _sorted_keys(val)]
            elif isinstance(val, int) and not isinstance(val, bool):
                if len(node.pipe.decl) > 1:
                    raise self.error(f"can't use {val} to iterate over more than one variable")
                items = ((i, i) for i in range(val)) if val > 0 else []
            else:
                raise self.error(f"range can't iterate over {_sprint_value(val)}")
            if isinstance(items, list) and not items:
                if node.else_list is not None:
                    self.walk(dot, node.else_list)
                return
            decl = node.pipe.decl
            for index, elem in items:
                if decl:
                    if node.pipe.is_assign:
                        if len(decl) == 1:
                            self.set_var(decl[0], elem)
                        else:
                            self.set_var(decl[0], index)
                            self.set_var(decl[1], elem)
                    else:
                        self.vars[-1][1] = elem
                        if len(decl) > 1:
                            self.vars[-2][1] = index
                inner = len(self.vars)
                try:
                    self.walk(elem, node.list)
                except _Continue:
                    pass
                except _Break:
                    break
                finally:
                    del self.vars[inner:]
        finally:
            del self.vars[mark:]

    def print_value(self, v: Any) -> str:
        if v is None:
            return "<no value>"
        return _sprint_value(v)

    # evaluation
    def eval_pipeline(self, dot: Any, pipe: PipeNode | None) -> Any:
        if pipe is None:
            return None
        value: Any = _MISSING
        for cmd in pipe.cmds:
            value = self.eval_command(dot, cmd, value)
        for name in pipe.decl:
            if pipe.is_assign:
                self.set_var(name, value)
            else:
                self.vars.append([name, value])
        return value

    def not_a_function(self, args: list[Node], final: Any) -> None:
        if len(args) > 1 or final is not _MISSING:
            raise self.error(f"can't give argument to non-function {_node_str(args[0])}")

    def eval_command(self, dot: Any, cmd: CommandNode, final: Any) -> Any:
        first = cmd.args[0]
        self.node = first
        if isinstance(first, FieldNode):
            return self.eval_field_chain(dot, dot, first, first.idents, cmd.args, final)
        if isinstance(first, ChainNode):
            return self.eval_chain(dot, first, cmd.args, final)
        if isinstance(first, IdentifierNode):
            return self.eval_function(dot, first, cmd.args, final)
        if isinstance(first, PipeNode):
            self.not_a_function(cmd.args, final)
            return self.eval_pipeline(dot, first)
        if isinstance(first, VariableNode):
            return self.eval_variable(dot, first, cmd.args, final)
        self.not_a_function(cmd.args, final)
        if isinstance(first, BoolNode):
            return first.value
        if isinstance(first, DotNode):
            return dot
        if isinstance(first, NilNode):
            raise self.error("nil is not a command")
        if isinstance(first, NumberNode):
            return first.value
        if isinstance(first, StringNode):
            return first.value
        raise self.error(f"can't evaluate command {_node_str(first)!r}")

    def eval_chain(self, dot: Any, chain: ChainNode, args: list[Node], final: Any) -> Any:
        if isinstance(chain.node, NilNode):
            raise self.error(f"indirection through explicit nil in {chain}")
        receiver = self.eval_arg(dot, chain.node)
        return self.eval_field_chain(dot, receiver, chain, chain.fields, args, final)

    def eval_variable(self, dot: Any, node: VariableNode, args: list[Node], final: Any) -> Any:
        value = self.var(node.idents[0])
        if len(node.idents) == 1:
            self.not_a_function(args, final)
            return value
        return self.eval_field_chain(dot, value, node, node.idents[1:], args, final)

    def eval_field_chain(
        self, dot: Any, receiver: Any, node: Node, idents: list[str], args: list[Node], final: Any
    ) -> Any:
        for name in idents[:-1]:
            receiver = self.eval_field(receiver, name, False)
        has_args = len(args) > 1 or final is not _MISSING
        return self.eval_field(receiver, idents[-1], has_args)

    def eval_field(self, receiver: Any, name: str, has_args: bool) -> Any:
        if receiver is None:
            raise self.error(f"nil pointer evaluating interface {{}}.{name}")
        if isinstance(receiver, GoStruct):
            if name not in receiver.fields:
                raise self.error(f"can't evaluate field {name} in type {receiver.type_name}")
            if has_args:
                raise self.error(f"{name} has arguments but cannot be invoked as function")
            return receiver.fields[name]
        if isinstance(receiver, dict):
            if has_args:
                raise self.error(f"{name} is not a method but has arguments")
            if receiver and not all(isinstance(k, str) for k in receiver):
                raise self.error(f"can't evaluate field {name} in type {_type_name(receiver)}")
            return receiver.get(name)
        raise self.error(f"can't evaluate field {name} in type {_type_name(receiver)}")

    def eval_arg(self, dot: Any, n: Node) -> Any:
        self.node = n
        if isinstance(n, DotNode):
            return dot
        if isinstance(n, NilNode):
            return None
        if isinstance(n, FieldNode):
            return self.eval_field_chain(dot, dot, n, n.idents, [n], _MISSING)
        if isinstance(n, VariableNode):
            return self.eval_variable(dot, n, [n], _MISSING)
        if isinstance(n, PipeNode):
            return self.eval_pipeline(dot, n)
        if isinstance(n, IdentifierNode):
            return self.eval_function(dot, n, [n], _MISSING)
        if isinstance(n, ChainNode):
            return self.eval_chain(dot, n, [n], _MISSING)
        if isinstance(n, BoolNode):
            return n.value
        if isinstance(n, NumberNode):
            return n.value
        if isinstance(n, StringNode):
            return n.value
        raise self.error(f"can't handle {_node_str(n)} as argument")

    def eval_function(self, dot: Any, node: IdentifierNode, args: list[Node], final: Any) -> Any:
        name = node.name
        entry = self.funcs.get(name)
        if entry is None:
            raise self.error(f'"{name}" is not a defined function')
        fn, min_args, max_args = entry
        arg_nodes = args[1:]
        nargs = len(arg_nodes) + (0 if final is _MISSING else 1)
        if nargs < min_args or (max_args is not None and nargs > max_args):
            if max_args is None:
                want = f"at least {min_args}"
            elif min_args == max_args:
                want = str(min_args)
            else:
                want = f"{min_args} to {max_args}"
            self.node = node
            raise self.error(f"wrong number of args for {name}: want {want} got {nargs}")
        if name in ("and", "or"):
            v: Any = None
            for a in arg_nodes:
                v = self.eval_arg(dot, a)
                if is_true(v) == (name == "or"):
                    return v
            if final is not _MISSING:
                v = final
            return v
        values = [self.eval_arg(dot, a) for a in arg_nodes]
        if final is not _MISSING:
            values.append(final)
        self.node = node
        try:
            self.budget.spend(CALL_UNITS)
            self.budget.allow(_FUNC_BOUNDS.get(name, _read_bound)(self.budget, values), name)
            result = fn(*values)
            if isinstance(result, str):  # a slice shares its list's items, as in Go
                self.budget.allocate(result, name)
            return result
        except _FuncError as e:
            raise self.error(f"error calling {name}: {e}") from None
        except TemplateError:
            raise
        except (ValueError, TypeError, OverflowError, KeyError, IndexError, RecursionError) as e:
            raise self.error(f"error calling {name}: {e}") from None


def identifiers(node: Node | None) -> list[str]:
    """The field and variable names a tree mentions, the way Ollama's
    ``template.Identifiers`` collects them (it decides which data a template
    gets)."""
    out: list[str] = []

    def walk(n: Node | None) -> None:
        if n is None:
            return
        if isinstance(n, ListNode):
            for c in n.nodes:
                walk(c)
        elif isinstance(n, TemplateCallNode):
            walk(n.pipe)
        elif isinstance(n, ActionNode):
            walk(n.pipe)
        elif isinstance(n, BranchNode):
            walk(n.pipe)
            walk(n.list)
            walk(n.else_list)
        elif isinstance(n, PipeNode):
            for c in n.cmds:
                for a in c.args:
                    walk(a)
        elif isinstance(n, (FieldNode, VariableNode)):
            out.extend(n.idents)

    walk(node)
    return out


def cut_after_response(root: ListNode) -> ListNode:
    """A copy of ``root`` with everything after the first ``.Response`` field
    removed, the way Ollama renders the last turn of a conversation that ends
    with an assistant message (so the model continues that message)."""
    tree = copy.deepcopy(root)
    cut = False

    def deleted(n: Node) -> bool:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.idents:
            cut = True
            return False
        return cut

    def walk(n: Node) -> Node | None:
        if deleted(n):
            return None
        if isinstance(n, ListNode):
            n.nodes = [c for c in (walk(x) for x in n.nodes) if c is not None]
        elif isinstance(n, BranchNode):
            body = walk(n.list)
            n.list = body if isinstance(body, ListNode) else ListNode(n.line)
            if n.else_list is not None:
                el = walk(n.else_list)
                n.else_list = el if isinstance(el, ListNode) else None
        elif isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            if pipe is None:
                return None
            assert isinstance(pipe, PipeNode)
            n.pipe = pipe
        elif isinstance(n, PipeNode):
            cmds = []
            for c in n.cmds:
                args = [a for a in (walk(x) for x in c.args) if a is not None]
                if not args:
                    return None
                c.args = args
                cmds.append(c)
            if not cmds:
                return None
            n.cmds = cmds
        return n

    result = walk(tree)
    return result if isinstance(result, ListNode) else ListNode(1)


class GoTemplate:
    """A parsed Go template. ``GoTemplate(text)`` raises TemplateError naming
    the line for anything Go's parser would reject."""

    def __init__(self, text: str, *, funcs: Mapping[str, tuple[Callable[..., Any], int, int | None]] | None = None) -> None:
        self.text = text
        self.funcs = dict(BUILTINS)
        if funcs:
            self.funcs.update(funcs)
        parser = _Parser(text, self.funcs)
        self.root = parser.parse()
        self.templates = parser.templates

    def identifiers(self) -> list[str]:
        """Field and variable names used anywhere (root and defined templates)."""
        names = identifiers(self.root)
        for body in self.templates.values():
            names.extend(identifiers(body))
        return names

    def execute(self, data: Any, *, root: ListNode | None = None, budget: Budget | None = None) -> str:
        """Render with ``data`` as dot and ``$``; errors are TemplateError
        naming the line. Work and sizes are charged to ``budget`` (see
        :mod:`ember.templates.budget`; by default a fresh one)."""
        ex = _Exec(self, data, self.funcs, budget or Budget())
        try:
            with using(ex.budget):
                ex.walk(data, root if root is not None else self.root)
        except (_Break, _Continue):  # pragma: no cover - the parser rejects these outside range
            raise ex.error("break or continue outside range") from None
        except RecursionError:
            raise ex.error("template nesting too deep") from None
        except BudgetExceeded as e:
            raise ex.error(f"template too expensive: {e}") from None
        return "".join(ex.out)

    def iter_nodes(self) -> Iterator[Node]:
        """All nodes of the root tree, depth first."""
        stack: list[Node] = [self.root]
        while stack:
            n = stack.pop()
            yield n
            if isinstance(n, ListNode):
                stack.extend(reversed(n.nodes))
            elif isinstance(n, BranchNode):
                if n.else_list is not None:
                    stack.append(n.else_list)
                stack.append(n.list)
                stack.append(n.pipe)
            elif isinstance(n, ActionNode):
                stack.append(n.pipe)
            elif isinstance(n, PipeNode):
                for c in reversed(n.cmds):
                    stack.extend(reversed(c.args))
