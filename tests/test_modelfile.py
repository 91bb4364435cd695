"""Modelfile grammar: Ollama's syntax, typed parameters, errors with line numbers,
and to_text() round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_fixtures import qwen_modelfile

from ember.errors import ModelfileError
from ember.registry.modelfile import Modelfile, decode, parse_modelfile, quote, read_modelfile


def test_qwen_modelfile_from_users_document() -> None:
    mf = parse_modelfile(qwen_modelfile())
    assert mf.from_ == ["qwen2.5-7b-instruct-q4_k_m.gguf"]
    assert mf.parameters == {"temperature": 0.7, "top_p": 0.8, "repeat_penalty": 1.05, "top_k": 20}
    assert isinstance(mf.parameters["top_k"], int) and isinstance(mf.parameters["top_p"], float)
    assert mf.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert mf.template is not None
    assert mf.template.startswith("{{ if .Messages }}\n{{- if or .System .Tools }}<|im_start|>system\n")
    assert mf.template.endswith("{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}")
    # the template holds quotes and JSON braces; nothing may be lost
    assert '{"name": <function-name>, "arguments": <args-json-object>}' in mf.template
    src = qwen_modelfile()
    expected = src[src.index('TEMPLATE """') + len('TEMPLATE """') : src.index('"""\n\n# set the system')]
    assert mf.template == expected and expected.count("\n") == 43
    again = parse_modelfile(mf.to_text())
    assert (again.from_, again.parameters, again.template, again.system) == (mf.from_, mf.parameters, mf.template, mf.system)


def test_instructions_are_case_insensitive_and_comments_skipped() -> None:
    mf = parse_modelfile(
        "# a comment\n  from ./m.gguf\nParameter temperature 0\nsystem  hello  world  \n"
        "  # indented comment\nPARAMETER stop <|im_end|>\nPARAMETER stop \"  User:\"\n"
        "parameter seed 42\nparameter use_mmap false\n"
    )
    assert mf.from_ == ["./m.gguf"]
    assert mf.system == "hello  world"  # inner blanks kept, outer trimmed
    assert mf.parameters == {"temperature": 0.0, "stop": ["<|im_end|>", "  User:"], "seed": 42, "use_mmap": False}


def test_quoted_values_multiline_and_escapes() -> None:
    text = (
        'FROM m.gguf\n'
        'TEMPLATE """{{ .System }}\n'
        'He said "hi" and """quoted""" mid-line\n'
        '{{ .Prompt }}"""\n'
        'SYSTEM "a \\"quoted\\" word \\\\ and C:\\models\\x"\n'
        'LICENSE """MIT\n\nCopyright"""\n'
        'LICENSE Apache-2.0\n'
        'MESSAGE user """two\nlines"""\n'
        'MESSAGE assistant ok # not a comment\n'
        'MESSAGE system "spans\nlines"\n'
    )
    mf = parse_modelfile(text)
    assert mf.template == '{{ .System }}\nHe said "hi" and """quoted""" mid-line\n{{ .Prompt }}'
    assert mf.system == 'a "quoted" word \\ and C:\\models\\x'
    assert mf.licenses == ["MIT\n\nCopyright", "Apache-2.0"]
    assert mf.messages == [
        {"role": "user", "content": "two\nlines"},
        {"role": "assistant", "content": "ok # not a comment"},
        {"role": "system", "content": "spans\nlines"},
    ]


def test_encodings_bom_and_crlf(tmp_path: Path) -> None:
    text = "FROM ./m.gguf\r\nSYSTEM \"\"\"héllo\r\nwörld\"\"\"\r\nPARAMETER num_ctx 2048\r\n"
    for enc, bom in (("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")):
        f = tmp_path / f"Modelfile.{enc}{len(bom)}"
        f.write_bytes(bom + text.encode(enc))
        mf = read_modelfile(f)
        assert mf.system == "héllo\nwörld", enc
        assert mf.parameters == {"num_ctx": 2048}
        assert mf.base_dir == tmp_path.resolve()
        assert mf.resolve_path(mf.from_[0]) == tmp_path.resolve() / "m.gguf"
    with pytest.raises(ModelfileError, match=r"line 2: not valid UTF-8"):
        decode(b"FROM x\nSYSTEM \xff\xfe\xfa\n", "Modelfile")


def test_paths_relative_to_modelfile_and_home(tmp_path: Path) -> None:
    mf = parse_modelfile("FROM ../m.gguf\nFROM ~/x.gguf\nFROM /abs/y.gguf\n", base_dir=tmp_path / "sub")
    assert mf.resolve_path(mf.from_[0]) == tmp_path / "m.gguf"
    assert mf.resolve_path(mf.from_[1]) == Path.home() / "x.gguf"
    assert mf.resolve_path(mf.from_[2]) == Path("/abs/y.gguf")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM m.gguf\n\n\n\n\nPARAMETER top_k 1\nPARAMETER temprature 0.5\n",
         "Modelfile line 7: unknown parameter 'temprature' (did you mean 'temperature'?)"),
        ("FROM m.gguf\nPARAMETER top_k lots\n", "Modelfile line 2: parameter 'top_k' needs an integer, got \"lots\""),
        ("FROM m.gguf\nPARAMETER top_p 3\n", "Modelfile line 2: parameter 'top_p' must be between 0 and 1, got 3.0"),
        ("FROM m.gguf\nSYSTM hi\n", "Modelfile line 2: unknown instruction 'SYSTM' (did you mean SYSTEM?)"),
        ("FROM m.gguf\nFOO bar\n", "Modelfile line 2: unknown instruction 'FOO'; use one of FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE, MESSAGE"),
        ("FROM m.gguf\nMESSAGE tool hi\n", "Modelfile line 2: MESSAGE role must be system, user or assistant, got 'tool'"),
        ("FROM m.gguf\nMESSAGE user\n", "Modelfile line 2: MESSAGE user needs a value"),
        ("FROM m.gguf\nPARAMETER\n", "Modelfile line 2: PARAMETER needs a parameter name and a value"),
        ("FROM m.gguf\nSYSTEM\n", "Modelfile line 2: SYSTEM needs a value"),
        ('FROM m.gguf\nSYSTEM ok\nTEMPLATE """{{ .Prompt }}\n\nno end\n', 'Modelfile line 3: unterminated """ value'),
        ('FROM m.gguf\nSYSTEM "no end\n', 'Modelfile line 2: unterminated " value'),
        ("SYSTEM hi\n# FROM commented out\n", "Modelfile: no FROM line"),
        ("", "Modelfile: no FROM line"),
        ("FROM m.gguf\nDRAFT d.gguf\n", "Modelfile line 2: DRAFT is not supported by ember"),
    ],
)
def test_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_error_names_the_file() -> None:
    with pytest.raises(ModelfileError, match=r"^/x/Modelfile\.qwen line 2: unknown parameter"):
        parse_modelfile("FROM a\nPARAMETER nope 1\n", filename="/x/Modelfile.qwen")


@pytest.mark.parametrize(
    "value",
    ["plain", " leading", "trailing ", "", '"starts quoted', 'ends quoted"', 'a """ b', 'line\n"""\nx',
     'ends with """', '"""', "multi\nline\n", 'both "\n" kinds """ of quotes"', "back\\slash \\\" mix", "tab\tinside", "\n"],
)
def test_quote_round_trips(value: str) -> None:
    mf = parse_modelfile(f"FROM m\nSYSTEM {quote(value)}\nMESSAGE user {quote(value)}\nPARAMETER stop {quote(value)}\n") if value.strip() else None
    if mf is not None:
        assert mf.system == value
        assert mf.messages == [{"role": "user", "content": value}]
        assert mf.parameters["stop"] == [value]
    else:
        mf = parse_modelfile(f"FROM m\nSYSTEM {quote(value)}\n")
        assert mf.system == value


def test_to_text_round_trip_of_everything() -> None:
    mf = Modelfile(
        from_=["/models/a-00001-of-00002.gguf", "/models/a-00002-of-00002.gguf"],
        parameters={"stop": ["<|im_end|>", " User:"], "temperature": 0.2, "num_ctx": 8192, "use_mmap": False},
        template='{{ if .System }}"sys"{{ end }}\n',
        system="  padded  ",
        adapters=["./lora.gguf"],
        licenses=["MIT", "line1\nline2"],
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": 'say "x"'}],
    )
    back = parse_modelfile(mf.to_text())
    for field in ("from_", "parameters", "template", "system", "adapters", "licenses", "messages"):
        assert getattr(back, field) == getattr(mf, field), field
