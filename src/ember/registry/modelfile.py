r'''Ollama's Modelfile: parser and writer.

Grammar (Ollama's, made explicit):

* One instruction per line, case-insensitive: ``FROM`` (repeatable),
  ``PARAMETER name value``, ``TEMPLATE``, ``SYSTEM``, ``ADAPTER``, ``LICENSE``
  (repeatable), ``MESSAGE role text`` (role: system, user or assistant).
  A line whose first non-blank character is ``#`` is a comment; ``#`` later in
  a line is part of the value (as in Ollama).
* A value is either the rest of the line (trimmed), ``"""..."""`` or
  ``"..."``. Quoted values may span lines; as in Ollama, the closing quote is
  the first one that ends a line (trailing blanks allowed), so a value may
  contain quotes. ``"""`` values are raw; in ``"..."`` values ``\"`` and
  ``\\`` are escapes (every other backslash is literal, so Windows paths and
  ``\n`` in stop strings mean what they meant in Ollama).
* Files may be UTF-8 (with or without BOM) or UTF-16 LE/BE with a BOM; CRLF
  line ends are read as LF.

Errors are :class:`ModelfileError` ``"<file> line N: what is wrong"``.
'''

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember import options
from ember.errors import ModelfileError, OptionError

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE")
UNSUPPORTED = ("DRAFT", "RENDERER", "PARSER", "REQUIRES")
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Command:
    name: str  # lower-case instruction ("from", "parameter", ...)
    args: str
    line: int
    key: str = ""  # parameter name or message role


@dataclass
class Modelfile:
    """A parsed Modelfile. ``from_`` keeps FROM values as written; use
    :meth:`resolve_path` to turn one into a path relative to the Modelfile."""

    from_: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    base_dir: Path | None = None
    filename: str = "Modelfile"
    commands: list[Command] = field(default_factory=list)

    def line_of(self, name: str, index: int = 0) -> int | None:
        """Line number of the ``index``-th command ``name`` (for error messages)."""
        found = [c.line for c in self.commands if c.name == name]
        return found[index] if index < len(found) else None

    def where(self, name: str, index: int = 0) -> str:
        line = self.line_of(name, index)
        return f"{self.filename} line {line}" if line else self.filename

    def resolve_path(self, value: str) -> Path:
        """Expand ``~`` and make a relative path relative to the Modelfile's folder."""
        p = Path(os.path.expanduser(value))
        if not p.is_absolute():
            p = (self.base_dir or Path.cwd()) / p
        return Path(os.path.abspath(p))

    def to_text(self) -> str:
        """A Modelfile that parses back to the same values."""
        out: list[str] = []
        for f in self.from_:
            out.append(f"FROM {quote(f)}")
        for a in self.adapters:
            out.append(f"ADAPTER {quote(a)}")
        if self.template is not None:
            out.append(f"TEMPLATE {quote(self.template)}")
        if self.system is not None:
            out.append(f"SYSTEM {quote(self.system)}")
        out.extend(parameter_lines(self.parameters))
        for m in self.messages:
            out.append(f"MESSAGE {m['role']} {quote(m['content'])}")
        for lic in self.licenses:
            out.append(f"LICENSE {quote(lic)}")
        return "\n".join(out) + "\n"


def parameter_lines(parameters: dict[str, Any]) -> list[str]:
    out = []
    for name, value in parameters.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            out.append(f"PARAMETER {name} {quote(format_value(v))}")
    return out


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def quote(value: str) -> str:
    """Write ``value`` so that :func:`parse_modelfile` reads it back unchanged."""
    if value and "\n" not in value and "\r" not in value and value == value.strip() and not value.startswith('"'):
        return value
    candidate = '"""' + value + '"""'
    if _roundtrips(candidate, value):
        return candidate
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _roundtrips(quoted: str, value: str) -> bool:
    try:
        got, _ = _read_value(quoted.split("\n"), 0, 0, "x")
    except ModelfileError:
        return False
    return got == value


def decode(data: bytes, filename: str = "Modelfile") -> str:
    """Bytes -> text: UTF-16 (LE/BE) with BOM, UTF-8 with or without BOM."""
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ModelfileError(
            f"{filename} line {line}: not valid UTF-8 or UTF-16 text (save the file as UTF-8)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_modelfile(path: str | os.PathLike[str]) -> Modelfile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelfileError(f"Modelfile not found: {path} (give one with -f FILE)") from None
    except IsADirectoryError:
        raise ModelfileError(f"{path} is a folder, not a Modelfile (give one with -f FILE)") from None
    except OSError as e:
        raise ModelfileError(f"cannot read Modelfile {path}: {e.strerror}") from None
    return parse_modelfile(decode(data, str(path)), base_dir=path.resolve().parent, filename=str(path))


def parse_modelfile(text: str, *, base_dir: Path | None = None, filename: str = "Modelfile") -> Modelfile:
    """Parse Modelfile text. Parameters are typed with :mod:`ember.options`;
    unknown instructions, parameters and message roles are errors."""
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    mf = Modelfile(base_dir=base_dir, filename=filename)
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        lineno = i + 1
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        word, _, rest = _split_word(stripped)
        upper = word.upper()

        def err(msg: str, line: int = lineno) -> ModelfileError:
            return ModelfileError(f"{filename} line {line}: {msg}")

        if upper not in INSTRUCTIONS:
            if upper in UNSUPPORTED:
                raise err(f"{upper} is not supported by ember")
            hint = difflib.get_close_matches(upper, INSTRUCTIONS, n=1)
            extra = f" (did you mean {hint[0]}?)" if hint else f"; use one of {', '.join(INSTRUCTIONS)}"
            raise err(f"unknown instruction {word!r}{extra}")
        key = ""
        if upper in ("PARAMETER", "MESSAGE"):
            key, _, rest = _split_word(rest)
            if not key:
                what = "a parameter name and a value" if upper == "PARAMETER" else "a role and a message"
                raise err(f"{upper} needs {what}")
        if not rest:
            raise err(f"{upper}{' ' + key if key else ''} needs a value")
        start_col = len(lines[i]) - len(lines[i].lstrip()) + (len(stripped) - len(rest))
        value, end = _read_value(lines, i, start_col, filename)
        cmd = Command(upper.lower(), value, lineno, key)
        _apply(mf, cmd, err)
        mf.commands.append(cmd)
        i = end + 1
    if not mf.from_:
        raise ModelfileError(f"{filename}: no FROM line; add 'FROM <GGUF file, folder or model name>'")
    return mf


def _split_word(s: str) -> tuple[str, str, str]:
    for j, ch in enumerate(s):
        if ch in " \t":
            return s[:j], ch, s[j:].lstrip(" \t")
    return s, "", ""


def _read_value(lines: list[str], i: int, col: int, filename: str) -> tuple[str, int]:
    """Read a value starting at ``lines[i][col:]``; return (value, last line index)."""
    first = lines[i][col:]
    if first.startswith('"""'):
        body = first[3:]
        for j in range(i, len(lines)):
            current = body if j == i else lines[j]
            closed = current.rstrip(" \t")
            if closed.endswith('"""') and (j > i or len(closed) >= 3):
                text = "\n".join([body] + lines[i + 1 : j + 1]).rstrip(" \t")
                return text[:-3], j
        raise ModelfileError(f'{filename} line {i + 1}: unterminated """ value (close it with """ at the end of a line)')
    if first.startswith('"'):
        out: list[str] = []
        j, k, line = i, 1, first
        while True:
            while k < len(line):
                ch = line[k]
                if ch == "\\" and k + 1 < len(line) and line[k + 1] in '"\\':
                    out.append(line[k + 1])
                    k += 2
                    continue
                if ch == '"' and not line[k + 1 :].strip(" \t"):
                    return "".join(out), j
                out.append(ch)
                k += 1
            j += 1
            if j >= len(lines):
                raise ModelfileError(f'{filename} line {i + 1}: unterminated " value (close it with " at the end of a line)')
            out.append("\n")
            line, k = lines[j], 0
    return first.strip(" \t"), i


def _apply(mf: Modelfile, cmd: Command, err: Any) -> None:
    name, value = cmd.name, cmd.args
    if name == "from":
        mf.from_.append(value)
    elif name == "adapter":
        mf.adapters.append(value)
    elif name == "template":
        mf.template = value
    elif name == "system":
        mf.system = value
    elif name == "license":
        mf.licenses.append(value)
    elif name == "message":
        role = cmd.key.lower()
        if role not in MESSAGE_ROLES:
            raise err(f"MESSAGE role must be system, user or assistant, got {cmd.key!r}")
        mf.messages.append({"role": role, "content": value})
    elif name == "parameter":
        pname = cmd.key.lower()
        if pname not in options.SPECS:
            hint = difflib.get_close_matches(pname, list(options.SPECS), n=1)
            raise err(f"unknown parameter {cmd.key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if options.SPECS[pname].type is list:
            # Taken verbatim: stop strings may begin or end with blanks.
            mf.parameters.setdefault(pname, []).append(value)
            return
        try:
            # coerce() applies the range checks parse_value() leaves out for numbers.
            parsed = options.coerce(pname, options.parse_value(pname, value))
        except OptionError as e:
            raise err(str(e)) from None
        mf.parameters[pname] = parsed
