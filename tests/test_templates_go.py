"""Go template (Ollama TEMPLATE) rendering.

Golden files: real Ollama templates under tests/data/templates/go/*.gotmpl
(the Qwen2.5 one is the user's Modelfile), conversations in cases.json, and the
expected prompts under go/<template>/<case>.txt, derived by hand from Go's
text/template rules (trim markers eat all adjacent whitespace) and Ollama's
template.Execute (messages path vs. per-turn legacy path cut after
.Response, suffix path, {{ .Response }} appended when missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.errors import TemplateError
from ember.templates import ChatTemplate
from ember.templates.gotemplate import GoTemplate, go_json, go_sprintf

DATA = Path(__file__).parent / "data" / "templates"
CASES = json.loads((DATA / "cases.json").read_text(encoding="utf-8"))
GOLDEN = sorted((p.parent.name, p.stem) for p in (DATA / "go").glob("*/*.txt"))


def render_case(tmpl: ChatTemplate, case: dict) -> str:
    if "prompt" in case:
        return tmpl.render_prompt(case["prompt"], system=case.get("system", ""), suffix=case.get("suffix", ""))
    return tmpl.render_messages(case["messages"], tools=case.get("tools"))


def test_golden_set_covers_required_templates() -> None:
    names = {name for name, _ in GOLDEN}
    assert {"qwen2.5", "llama3.1", "mistral", "gemma3", "starling", "mistral-v0.1"} <= names
    for name in ("qwen2.5", "llama3.1", "mistral"):
        cases = {case for n, case in GOLDEN if n == name}
        assert {"user", "user-assistant-user", "system-user-assistant-user", "tools-user", "tools-call-result"} <= cases


@pytest.mark.parametrize(("name", "case"), GOLDEN, ids=[f"{n}/{c}" for n, c in GOLDEN])
def test_golden(name: str, case: str) -> None:
    tmpl = ChatTemplate.parse((DATA / "go" / f"{name}.gotmpl").read_text(encoding="utf-8"))
    assert tmpl.kind == "go"
    expected = (DATA / "go" / name / f"{case}.txt").read_bytes().decode("utf-8")
    assert render_case(tmpl, CASES[case]) == expected


def test_qwen_modelfile_template_is_the_users() -> None:
    # The Qwen2.5 golden template is byte-for-byte the TEMPLATE of the user's
    # Modelfile (seed 003, shipped in tests/data/modelfiles).
    modelfile = (DATA.parent / "modelfiles" / "qwen2.5.Modelfile").read_text(encoding="utf-8")
    text = (DATA / "go" / "qwen2.5.gotmpl").read_text(encoding="utf-8")
    assert text.startswith("{{ if .Messages }}\n{{- if or .System .Tools }}<|im_start|>system")
    assert f'TEMPLATE """{text}"""' in modelfile


def test_qwen_tool_call_arguments_from_openai_json_string() -> None:
    tmpl = ChatTemplate.parse((DATA / "go" / "qwen2.5.gotmpl").read_text(encoding="utf-8"))
    case = json.loads(json.dumps(CASES["tools-call-result"]))
    call = case["messages"][2]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps(call["arguments"])  # OpenAI sends a JSON string
    case["messages"][2]["content"] = None  # and a null content
    expected = (DATA / "go" / "qwen2.5" / "tools-call-result.txt").read_text(encoding="utf-8")
    assert render_case(tmpl, case) == expected


# ---------------------------------------------------------------- Ollama rules


def test_legacy_template_renders_each_turn_and_continues_the_last() -> None:
    # Ollama's own documented cases (template_test.go TestExecuteWithMessages).
    msgs = [
        {"role": "user", "content": "Hello friend!"},
        {"role": "assistant", "content": "Hello human!"},
        {"role": "user", "content": "What is your name?"},
    ]
    want = "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    for text in (
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] ",
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] {{ .Response }}",
        '[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n{{- if eq .Role "user" }}'
        '{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n{{- end }}',
    ):
        assert ChatTemplate.parse(text).render_messages(msgs) == want
    more = [*msgs, {"role": "assistant", "content": "My name is Ollama and I"}]
    assert (
        ChatTemplate.parse("[INST] {{ .Prompt }}[/INST] {{ .Response }}").render_messages(more)
        == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"
    )


def test_collate_merges_consecutive_roles_but_not_tools() -> None:
    tmpl = ChatTemplate.parse("{{ range .Messages }}[{{ .Role }}:{{ .Content }}:{{ .ToolName }}]{{ end }}|{{ .System }}")
    out = tmpl.render_messages(
        [
            {"role": "system", "content": "a"},
            {"role": "system", "content": "b"},
            {"role": "user", "content": "u1"},
            {"role": "user", "content": "u2"},
            {"role": "tool", "content": "t1", "tool_name": "x"},
            {"role": "tool", "content": "t2", "tool_name": "y"},
        ]
    )
    assert out == "[system:a\n\nb:][user:u1\n\nu2:][tool:t1:x][tool:t2:y]|a\n\nb"


def test_missing_message_fields_are_zero_values() -> None:
    tmpl = ChatTemplate.parse(
        "{{ range .Messages }}{{ if .ToolCalls }}calls{{ else }}none{{ end }}"
        "({{ len .ToolCalls }}{{ .Thinking }}{{ .ToolName }}){{ end }}"
    )
    assert tmpl.render_messages([{"role": "user", "content": "hi"}]) == "none(0)"
    with pytest.raises(TemplateError, match=r"line 1: .*can't evaluate field Nope"):
        ChatTemplate.parse("{{ range .Messages }}{{ .Nope }}{{ end }}").render_messages([{"role": "user", "content": "x"}])


def test_missing_top_level_key_prints_no_value() -> None:
    # map[string]any with missingkey=zero: Go prints "<no value>".
    assert ChatTemplate.parse("{{ .Messages }}{{ .Prompt }}").render_messages([]) == "[]<no value>"


def test_tools_print_as_json_and_properties_range_in_key_order() -> None:
    tool = CASES["tools-user"]["tools"][0]
    tmpl = ChatTemplate.parse(
        "{{ range .Tools }}{{ range $name, $p := .Function.Parameters.Properties }}"
        "{{ $name }}:{{ $p.Type }}:{{ index $p.Type 0 }};{{ end }}|{{ .Function.Parameters }}{{ end }}"
        "|{{ json .Tools }}{{ if .Messages }}{{ end }}"
    )
    out = tmpl.render_messages([{"role": "user", "content": "x"}], tools=[tool])
    params = (
        '{"type":"object","required":["location","format"],"properties":{'
        '"format":{"type":"string","description":"The temperature unit to use","enum":["celsius","fahrenheit"]},'
        '"location":{"type":"string","description":"The city and country, e.g. Paris, France"}}}'
    )
    assert out.startswith("format:string:string;location:string:string;|" + params + "|[{")
    assert '"description":"Get the current weather for a location \\u0026 date"' in out


def test_think_values() -> None:
    tmpl = ChatTemplate.parse("{{ if .Messages }}{{ .Think }}/{{ .IsThinkSet }}{{ end }}")
    msgs = [{"role": "user", "content": "x"}]
    assert tmpl.render_messages(msgs) == "false/false"
    assert tmpl.render_messages(msgs, think=True) == "true/true"
    assert tmpl.render_messages(msgs, think=False) == "false/true"


def test_suffix_requires_a_template_that_uses_it() -> None:
    with pytest.raises(TemplateError, match="suffix"):
        ChatTemplate.parse((DATA / "go" / "qwen2.5.gotmpl").read_text()).render_prompt("x", suffix="y")


# ---------------------------------------------------------------- Go semantics


def render(text: str, data: object = None) -> str:
    return GoTemplate(text).execute(data)


@pytest.mark.parametrize(
    ("text", "data", "want"),
    [
        ("a  \n {{- 1 -}} \n\t b", None, "a1b"),
        ("a {{- /* comment */ -}} b", None, "ab"),
        ("a{{/* c */}}b", None, "ab"),
        ("{{-3}}", None, "-3"),
        ("x {{- 3 }} y", None, "x3 y"),
        ('{{ "a\\tb\\u00e9" }}{{ `raw\\n` }}', None, "a\tbé" + "raw\\n"),
        ("{{ 1.5 }} {{ 1e6 }} {{ 100000.0 }} {{ 0x1F }} {{ 'a' }}", None, "1.5 1e+06 100000 31 97"),
        ("{{ true }} {{ false }} {{ .x }}", {"x": None}, "true false <no value>"),
        ("{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}", {"a": 0, "b": [1]}, "B"),
        ("{{ if .a }}A{{ else }}C{{ end }}", {"a": {}}, "C"),
        ("{{ with .a }}{{ . }}{{ else }}none{{ end }}", {"a": "x"}, "x"),
        ("{{ with .a }}{{ . }}{{ else with .b }}b={{ . }}{{ end }}", {"a": "", "b": 2}, "b=2"),
        ("{{ range $i, $x := .l }}{{ $i }}{{ $x }}{{ else }}empty{{ end }}", {"l": ["a", "b"]}, "0a1b"),
        ("{{ range .l }}{{ . }}{{ else }}empty{{ end }}", {"l": []}, "empty"),
        ("{{ range $k, $v := .m }}{{ $k }}={{ $v }};{{ end }}", {"m": {"b": 2, "a": 1}}, "a=1;b=2;"),
        ("{{ range $x := .l }}{{ if eq $x 2 }}{{ continue }}{{ end }}{{ if eq $x 4 }}{{ break }}{{ end }}{{ $x }}{{ end }}",
         {"l": [1, 2, 3, 4, 5]}, "13"),
        ("{{ range 3 }}{{ . }}{{ end }}", None, "012"),
        ("{{ $x := 1 }}{{ range .l }}{{ $x = . }}{{ end }}{{ $x }}", {"l": [7, 8]}, "8"),
        ("{{ $.a }}{{ with .b }}{{ $.a }}{{ .c }}{{ end }}", {"a": "A", "b": {"c": "C"}}, "AAC"),
        ("{{ .a.b.c }}", {"a": {"b": {"c": 5}}}, "5"),
        ("{{ (index .l 1).k }}", {"l": [{}, {"k": "v"}]}, "v"),
        ("{{ and 1 0 2 }} {{ and 1 2 }} {{ or 0 \"\" }} {{ or 0 3 }} {{ not 0 }}", None, "0 2  3 true"),
        ("{{ eq 1 1 }} {{ eq \"a\" \"b\" \"a\" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt \"b\" \"a\" }} {{ ge 1 2 }}",
         None, "true true true true true true false"),
        ("{{ len .s }} {{ len .l }} {{ len .m }}", {"s": "héllo", "l": [1, 2], "m": {"a": 1}}, "6 2 1"),
        ("{{ slice .s 1 3 }} {{ slice .l 1 }} {{ index .l 0 }} {{ index .m \"a\" }} {{ index .m \"zz\" }}",
         {"s": "abcd", "l": [1, 2, 3], "m": {"a": 1}}, "bc [2 3] 1 1 <no value>"),
        ("{{ print 1 2 \"a\" \"b\" 3 }}|{{ println 1 \"a\" }}|{{ printf \"%s-%d-%v-%q-%5.2f-%x-%t-%%\" \"s\" 42 .l \"q\" 3.14159 255 true }}",
         {"l": [1, "a"]}, "1 2ab3|1 a\n|s-42-[1 a]-\"q\"- 3.14-ff-true-%"),
        ("{{ .s | printf \"%s!\" }} {{ \"x\" | len }} {{ 3 | printf \"%d-%d\" 2 }}", {"s": "hi"}, "hi! 1 2-3"),
        ("{{ html \"<a href='x'>&\" }} {{ urlquery \"a b&c\" }} {{ js \"it's\" }}", None,
         "&lt;a href=&#39;x&#39;&gt;&amp; a+b%26c it\\'s"),
        ("{{ json .v }}", {"v": {"b": [1, 2.5, None], "a": "<é>\n"}}, '{"a":"\\u003cé\\u003e\\n","b":[1,2.5,null]}'),
        ('{{ define "T" }}[{{ . }}]{{ end }}{{ template "T" "x" }}{{ block "B" 2 }}<{{ . }}>{{ end }}', None, "[x]<2>"),
        ("{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ $x }}{{ end }}{{ $x }}", None, "21"),
        ("{{ printf \"%v %v %v\" 1.0 0.000012 123456789.0 }}", None, "1 1.2e-05 1.23456789e+08"),
    ],
)
def test_go_semantics(text: str, data: object, want: str) -> None:
    assert render(text, data) == want


def test_printf_bad_verbs_match_go() -> None:
    assert go_sprintf("%d %s", "x") == "%!d(string=x) %!s(MISSING)"
    assert go_sprintf("%s", "a", 1) == "a%!(EXTRA int=1)"
    assert go_sprintf("%5s|%-5s|%05d|%x|%X|%c", "ab", "cd", 42, "hi", 255, 0x4E16) == "   ab|cd   |00042|6869|FF|世"


def test_printf_huge_widths_refused_like_go() -> None:
    # Go's fmt refuses widths/precisions above 1e6 (tooLarge), so a template
    # cannot make it allocate gigabytes.
    assert go_sprintf("%01000000000d", 1) == "%!(NOVERB)%!(EXTRA int=1)"
    assert go_sprintf("%0*d", 1_000_000_000, 1) == "%!(BADWIDTH)1"
    assert go_sprintf("%.*f", 10_000_000, 1.5) == "%!(BADPREC)1.500000"
    assert go_sprintf("%.1000000000f", 1.0) == "%!(NOVERB)%!(EXTRA float64=1)"
    assert len(go_sprintf("%1000000d", 1)) == 1_000_000


def test_json_matches_go_encoding() -> None:
    assert go_json(1e21) == "1e+21"
    assert go_json(1e-7) == "1e-7"
    assert go_json(123456789.0) == "123456789"
    assert go_json("\u2028\x01&") == '"\\u2028\\u0001\\u0026"'


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("hello\n{{ .Prompt ", r"^template line 2: unclosed action"),
        ("a\nb\n{{ foo .X }}", r'^template line 3: function "foo" not defined'),
        ("{{ if .X }}\nx\n{{ end }}\n{{ end }}", r"^template line 4: unexpected \{\{end\}\}"),
        ("{{ if .X }}\nx", r"^template line 2: unexpected EOF"),
        ("{{ range .X }}{{ else }}{{ else }}{{ end }}", r"expected end"),
        ("{{ $x }}", r'undefined variable "\$x"'),
        ("{{ break }}", r"\{\{break\}\} outside \{\{range\}\}"),
        ("{{ .X | 3 }}", r"non executable command in pipeline stage 2"),
        ("{{ \"abc }}", r"unterminated quoted string"),
        ("{{/* x }}", r"unclosed comment"),
        ("{{ ( .X }}", r"unclosed left paren"),
        ("{{ 3x }}", r"bad number syntax"),
        ("{{ }}", r"missing value for command"),
        ("{{ .X # }}", r"unrecognized character in action"),
    ],
)
def test_parse_errors_name_the_line(text: str, pattern: str) -> None:
    with pytest.raises(TemplateError, match=pattern):
        GoTemplate(text)


@pytest.mark.parametrize(
    ("text", "data", "pattern"),
    [
        ("{{ len 3 }}", None, r"error calling len: len of type int"),
        ("x\n{{ index .l 5 }}", {"l": [1]}, r"^template line 2: .*index out of range: 5"),
        ("{{ eq 1 \"a\" }}", None, r"incompatible types for comparison"),
        ("{{ slice .l 2 1 }}", {"l": [1, 2, 3]}, r"invalid slice index: 2 > 1"),
        ("{{ .a.b }}", {"a": None}, r"nil pointer evaluating"),
        ("{{ range .s }}{{ end }}", {"s": "abc"}, r"range can't iterate over abc"),
        ("{{ nil }}", None, r"nil is not a command"),
        ("{{ .a 1 }}", {"a": 1}, r"not a method but has arguments"),
        ("{{ len 1 2 }}", None, r"wrong number of args for len: want 1 got 2"),
        ("{{ range 10000000 }}{{ end }}", None, r"template too expensive: more than \d+ units of work"),
    ],
)
def test_execution_errors(text: str, data: object, pattern: str) -> None:
    with pytest.raises(TemplateError, match=pattern):
        render(text, data)


# ---------------------------------------------------------------- budgets (issue 13, item 5)
# A 2-million-step cap still let a template work for minutes: one step can
# encode a megabyte prompt (len, index), quote it (printf %q, json) or double
# a string. Each render now has a budget of work, sizes and memory
# (ember.templates.budget): each attack ends in an error after at most that
# budget, so the tests assert the error, not the time.

MEGABYTE = {"System": "s" * 1_000_000, "Prompt": "x" * 1_000_000}


def too_expensive(text: str, data: object, why: str = "") -> None:
    with pytest.raises(TemplateError, match=r"^template line \d+: executing.*: template too expensive: ") as e:
        render(text, data)
    assert why in str(e.value), str(e.value)


@pytest.mark.parametrize("text", [
    "{{ range 20000 }}{{ $n := len $.Prompt }}{{ end }}",
    "{{ range 20000 }}{{ $c := index $.Prompt 5 }}{{ end }}",
    "{{ range 20000 }}{{ $s := slice $.Prompt 1 }}{{ end }}",
    "{{ range 20000 }}{{ if eq $.Prompt $.System }}{{ end }}{{ end }}",
    "{{ range 20000 }}{{ $j := json $.Prompt }}{{ end }}",
    "{{ range 20000 }}{{ $j := js $.Prompt }}{{ end }}",
    "{{ range 20000 }}{{ $j := printf \"%q\" $.Prompt }}{{ end }}",
    "{{ range 20000 }}{{ $j := html $.Prompt }}{{ end }}",
])
def test_attack_loop_over_a_megabyte_prompt(text: str) -> None:
    too_expensive(text, MEGABYTE)


def test_attack_steps_alone() -> None:
    too_expensive("{{ range 100000000 }}{{ end }}", None, "units of work")
    too_expensive('{{ define "T" }}{{ range 1000 }}{{ range 1000 }}{{ end }}{{ end }}{{ end }}{{ range 1000 }}{{ template "T" }}{{ end }}',
                  None, "units of work")


def test_attack_output_of_a_loop() -> None:
    too_expensive("{{ range 20000 }}{{ $.Prompt }}{{ end }}", MEGABYTE, "the output could grow past")


def test_attack_printf_doubling() -> None:
    too_expensive('{{ $x := .Prompt }}{{ range 100 }}{{ $x = printf "%s%s" $x $x }}{{ end }}', MEGABYTE)
    too_expensive('{{ $x := .Prompt }}{{ range 100 }}{{ $x = print $x $x }}{{ end }}', MEGABYTE)
    # one call that would build 40 MB is refused before it starts
    too_expensive(f'{{{{ printf "{"%s" * 40}" {" .Prompt" * 40} }}}}', MEGABYTE, "printf could grow past")
    too_expensive(f'{{{{ print {" .Prompt" * 40} }}}}', MEGABYTE, "print could grow past")


def test_attack_printf_widths_repeated() -> None:
    fmt = "%999999d" * 100
    too_expensive(f'{{{{ printf "{fmt}" {" 1" * 100} }}}}', None, "printf could grow past")


def test_attack_memory_in_total() -> None:
    # each string is under the size limit; together they are gigabytes
    wide = "%999999d" * 30
    too_expensive(f'{{{{ range 10 }}}}{{{{ $x := printf "{wide}"{" 1" * 30} }}}}{{{{ end }}}}', None, "allocated in all")


def test_legacy_templates_share_one_budget() -> None:
    # a legacy template runs once per turn; the turns share one budget
    text = "{{ range 300000 }}{{ end }}{{ .Prompt }}"
    assert ChatTemplate.parse(text).render_messages([{"role": "user", "content": "hi"}]) == "hi"
    turns = [{"role": ("user", "assistant")[i % 2], "content": "x"} for i in range(20)]
    with pytest.raises(TemplateError, match="template too expensive"):
        ChatTemplate.parse(text).render_messages(turns)


def test_real_templates_render_long_conversations() -> None:
    """No false alarms: every real template renders a 2-million-character
    conversation and a thousand messages within the budget."""
    big = [{"role": "user", "content": "x" * 1_000_000}, {"role": "assistant", "content": "y" * 1_000_000},
           {"role": "user", "content": "z"}]
    many = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " * 20} for i in range(999)]
    for path in sorted((DATA / "go").glob("*.gotmpl")):
        tmpl = ChatTemplate.parse(path.read_text(encoding="utf-8"))
        assert tmpl.render_messages(big, tools=CASES["tools-user"]["tools"]).count("x") >= 1_000_000, path.name
        assert "message 998" in tmpl.render_messages(many), path.name


def test_template_error_from_chat_template_parse() -> None:
    with pytest.raises(TemplateError, match=r"^template line 3: "):
        ChatTemplate.parse("{{ if .System }}\n{{ .System }}\n{{ else }}{{ .Prompt }")


def test_detects_go_vs_jinja() -> None:
    assert ChatTemplate.parse("{{ .Prompt }}").kind == "go"
    assert ChatTemplate.parse("plain text").kind == "go"
    assert ChatTemplate.parse("{% for m in messages %}{{ m.content }}{% endfor %}").kind == "jinja"
    assert ChatTemplate.parse("{{ bos_token }}{{ messages[0]['content'] }}").kind == "jinja"
    # plain text gets {{ .Response }} appended, as in Ollama
    assert ChatTemplate.parse("Q: ").render_messages(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ) == "Q: b"
