"""Jinja chat template rendering against transformers' own apply_chat_template.

Templates: real Hugging Face chat templates (Qwen2.5, Qwen3, Llama 3.1,
Llama 3.2, Gemma 3) under tests/data/templates/jinja/*.jinja. Conversations:
tests/data/templates/cases.json (shared with the Go tests) plus a few
Jinja-only cases below. Expected prompts under jinja/<template>/<case>.txt were
written by transformers (EMBER_UPDATE_GOLDEN=1 rewrites them); each run also
compares with transformers live, so a stale golden file cannot hide a change.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ember.errors import TemplateError
from ember.templates import ChatTemplate
from ember.templates.budget import MAX_CHARS, MAX_INT_BITS, MAX_WORK
from ember.templates.jinja import JinjaChatTemplate

DATA = Path(__file__).parent / "data" / "templates"
JINJA = DATA / "jinja"
CASES: dict[str, Any] = {
    name: case for name, case in json.loads((DATA / "cases.json").read_text(encoding="utf-8")).items()
    if "messages" in case
}
_CALL = {"function": {"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}}
CASES["parallel-calls"] = {
    "tools": CASES["tools-user"]["tools"],
    "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            _CALL,
            {"function": {"name": "get_current_weather", "arguments": {"location": "Rome, Italy", "format": "celsius"}}},
        ]},
        {"role": "tool", "content": "22", "tool_name": "get_current_weather"},
        {"role": "tool", "content": "25", "tool_name": "get_current_weather"},
    ],
}
CASES["thinking-history"] = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "Two plus two is four."},
        {"role": "user", "content": "  And 3+3? \u00e9\u4e2d "},
    ],
}

# name -> (bos_token, eos_token) as in the model's tokenizer
TEMPLATES = {
    "qwen2.5": ("", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma3": ("<bos>", "<eos>"),
}
DATED = {"llama3.2"}  # strftime_now: compared live only
PAIRS = [(t, c) for t in TEMPLATES for c in CASES]


@functools.cache
def template(name: str) -> ChatTemplate:
    return ChatTemplate.parse((JINJA / f"{name}.jinja").read_text(encoding="utf-8"))


def ours(name: str, case: dict[str, Any], **kw: Any) -> str:
    bos, eos = TEMPLATES[name]
    return template(name).render_messages(case["messages"], tools=case.get("tools"), bos_token=bos, eos_token=eos, **kw)


def outcome(fn: Any) -> tuple[str, str]:
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - we compare what happened
        return "error", str(e)


@functools.cache
def hf_tokenizer(bos: str, eos: str) -> Any:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    kw = {"eos_token": eos, **({"bos_token": bos} if bos else {})}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kw)


def hf(name: str, case: dict[str, Any], **kw: Any) -> str:
    tok = hf_tokenizer(*TEMPLATES[name])
    tok.chat_template = (JINJA / f"{name}.jinja").read_text(encoding="utf-8")
    return str(
        tok.apply_chat_template(
            json.loads(json.dumps(case["messages"])), tools=case.get("tools"), tokenize=False,
            add_generation_prompt=True, **kw,
        )
    )


def test_templates_are_jinja_and_cover_required_cases() -> None:
    for name in TEMPLATES:
        assert template(name).kind == "jinja"
    assert {"user", "user-assistant-user", "system-user-assistant-user", "tools-user", "tools-call-result"} <= set(CASES)


@pytest.mark.parametrize(("name", "case"), PAIRS, ids=[f"{t}/{c}" for t, c in PAIRS])
def test_matches_transformers(name: str, case: str) -> None:
    got = outcome(lambda: ours(name, CASES[case]))
    want = outcome(lambda: hf(name, CASES[case]))
    if name in DATED and got != want:  # the date may have changed between the two calls
        time.sleep(0.01)
        got = outcome(lambda: ours(name, CASES[case]))
    if want[0] == "error":
        assert got[0] == "error", got[1]
        assert want[1] in got[1]  # the template's own raise_exception message
    else:
        assert got == want
    if name in DATED:
        return
    golden = JINJA / name / f"{case}.txt"
    if os.environ.get("EMBER_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes((want[1] if want[0] == "ok" else "ERROR: " + want[1]).encode("utf-8"))
    expected = golden.read_bytes().decode("utf-8")
    assert (got[1] if got[0] == "ok" else "ERROR: " + got[1]).endswith(expected.removeprefix("ERROR: "))


def test_golden_files_without_transformers() -> None:
    # The stored prompts pin the output even where transformers is absent.
    for name in TEMPLATES.keys() - DATED:
        for case in CASES:
            expected = (JINJA / name / f"{case}.txt").read_bytes().decode("utf-8")
            if expected.startswith("ERROR: "):
                with pytest.raises(TemplateError, match=r"^chat template line \d+: "):
                    ours(name, CASES[case])
            else:
                assert ours(name, CASES[case]) == expected, (name, case)


def test_known_prompts() -> None:
    # Hand-checked against the models' documented formats.
    assert ours("qwen2.5", CASES["user"]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours("gemma3", CASES["system-user-assistant-user"]) == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n<start_of_turn>model\n"
    )
    assert ours("llama3.1", CASES["user"]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
    )
    assert time.strftime("%d %b %Y") in ours("llama3.2", CASES["user"])


def test_enable_thinking_from_think() -> None:
    case = CASES["user"]
    off = ours("qwen3", case, think=False)
    assert off == hf("qwen3", case, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ours("qwen3", case, think=True) == hf("qwen3", case, enable_thinking=True) == ours("qwen3", case)


def test_generation_prompt_off_and_continuation() -> None:
    case = CASES["user-assistant"]
    t = template("qwen2.5")
    assert t.render_messages(case["messages"], add_generation_prompt=False).endswith("<|im_end|>\n")
    tok = hf_tokenizer("", "<|im_end|>")
    tok.chat_template = t.text
    msgs = [{"role": "user", "content": "Tell me"}]
    want = tok.apply_chat_template([*msgs, {"role": "assistant", "content": "Once upon"}], tokenize=False,
                                   continue_final_message=True)
    assert t.render_prompt("Tell me", response="Once upon") == want


# ---------------------------------------------------------------- HF context


def render(text: str, messages: list[dict[str, Any]] | None = None, **kw: Any) -> str:
    return JinjaChatTemplate(text).render(messages or [{"role": "user", "content": "hi"}], **kw)


def test_tojson_like_transformers() -> None:
    data = {"b": "é<&>", "a": [1, 2.5, None, True]}
    assert render("{{ x | tojson }}", extra={"x": data}) == '{"b": "é<&>", "a": [1, 2.5, null, true]}'
    assert render("{{ x | tojson(indent=2) }}", extra={"x": {"k": [1]}}) == '{\n  "k": [\n    1\n  ]\n}'
    assert render("{{ x | tojson(ensure_ascii=True, sort_keys=True) }}", extra={"x": data}).startswith('{"a": ')
    assert render("{{ x | tojson(separators=(',', ':')) }}", extra={"x": [1, 2]}) == "[1,2]"


def test_loop_controls_trim_and_lstrip_blocks() -> None:
    text = "{% for i in range(5) %}\n  {% if i == 1 %}{% continue %}{% endif %}\n  {% if i == 3 %}{% break %}{% endif %}\n{{ i }}\n{% endfor %}"
    assert render(text) == "0\n2\n"


def test_raise_exception_names_line_and_message() -> None:
    with pytest.raises(TemplateError, match=r"^chat template line 3: Only user and assistant roles are supported!$"):
        render("{% for m in messages %}\n{% if m.role != 'user' %}\n{{ raise_exception('Only user and assistant roles are supported!') }}\n{% endif %}{% endfor %}",
               [{"role": "system", "content": "x"}])


def test_strftime_now_and_special_tokens() -> None:
    out = render("{{ bos_token }}{{ strftime_now('%Y') }}{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert out == f"<s>{time.strftime('%Y')}</s>"


def test_none_values_dropped_like_transformers() -> None:
    assert render("{% for m in messages %}{{ 'content' in m }}{% endfor %}", [{"role": "assistant", "content": None}]) == "False"


def test_openai_string_arguments_render_as_objects() -> None:
    # OpenAI clients send arguments as a JSON string; templates expect an object.
    case = json.loads(json.dumps(CASES["parallel-calls"]))
    for call in case["messages"][1]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    assert ours("qwen2.5", case) == ours("qwen2.5", CASES["parallel-calls"])
    case["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(TemplateError, match="message 2: tool call arguments are not valid JSON"):
        ours("qwen2.5", case)


def test_input_messages_not_modified() -> None:
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    before = json.dumps(msgs)
    assert render("{{ messages[0].tool_calls[0].function.arguments.a }}", msgs) == "1"
    assert json.dumps(msgs) == before


# ---------------------------------------------------------------- sandbox and errors


@pytest.mark.parametrize(
    "text",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ namespace(_x=1) }}",
        "{{ self.__init__.__globals__ }}",
        "{{ (lipsum | attr('__globals__')) }}",
        "{{ '{0.__class__}'.format(1) }}",
    ],
)
def test_sandbox_refuses(text: str) -> None:
    with pytest.raises(TemplateError, match=r"^chat template line 1: "):
        render(text)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}", r"^chat template line 2: TypeError: can only concatenate"),
        ("a\nb\n{% if %}", r"^chat template line 3: Expected an expression"),
        ("{% for m in messages %}\n\n{{ m.content }", r"^chat template line 3: unexpected '}'"),
        ("{% for m in messages %}{{ m }}", r"^chat template line 1: Unexpected end of template.*'endfor'"),
        ("{% generation %}x", r"endgeneration"),
        ("\n\n{{ messages[5].content }}", r"^chat template line 3: list object has no element 5"),
        ("{{ x | nosuchfilter }}", r"^chat template line 1: No filter named 'nosuchfilter'"),
        ("x\n{{ undefined_var | tojson }}", r"^chat template line 2: "),
    ],
)
def test_errors_name_the_line(text: str, pattern: str) -> None:
    with pytest.raises(TemplateError, match=pattern):
        ChatTemplate.parse(text).render_messages([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "text",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{{ [1] * 100000000 }}",
        "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('xxxxxxxx') }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ 7 ** 99999999 }}",
        "{{ range(10000000) | list }}",
        "{{ lipsum(n=100000, max=100000) }}",
        "{{ 'x' | indent(width=100000000) }}",
        "{{ '%0*d' | format(100000000, 1) }}",
        "{{ '%0100000000d' | format(1) }}",
        "{{ '%0100000000d' % 1 }}",
        "{{ '%0*d' % (100000000, 1) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '{:{}}'.format(1, 1000000000) }}",
        "{{ 'x'.ljust(10000000000) }}",
        "{{ 'x'.zfill(10000000000) }}",
        "{{ ('x' * 1000000).replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy') }}",
        "{{ ('x' * 1000000).join(range(1000000)) }}",
    ],
)
def test_expensive_templates_are_stopped(text: str) -> None:
    with pytest.raises(TemplateError, match=r"too expensive|recursion too deep"):
        render(text)


def test_limits_leave_normal_use_alone() -> None:
    assert MAX_CHARS >= 1 << 24
    big = "x" * 1_000_000
    assert render("{% for m in messages %}{{ m.content | length }}{{ 10000000 | string }}{% endfor %}",
                  [{"role": "user", "content": big}]) == "100000010000000"
    assert render("{{ range(3) | list }}{{ range(5) | reverse | first }}{{ range(4) | length }}") == "[0, 1, 2]44"


# ---------------------------------------------------------------- budgets (issue 13, item 5)
# Attacks that step counting let through: each took seconds of CPU or
# gigabytes of memory. Every render now has a budget of work, sizes and
# memory (ember.templates.budget), so each attack ends in an error after at
# most that budget: the tests assert the error, not the time.

LONG = [{"role": "user", "content": "x" * 20_000}]
TWO_LONG = [{"role": "user", "content": "x" * 1_000_000}, {"role": "assistant", "content": "x" * 1_000_000}]


def too_expensive(text: str, messages: list[dict[str, Any]] | None = None, why: str = "") -> str:
    with pytest.raises(TemplateError, match=r"^chat template( line \d+)?: template too expensive: ") as e:
        render(text, messages)
    assert why in str(e.value), str(e.value)
    return str(e.value)


WORK = f"more than {MAX_WORK} units of work"


def test_attack_nested_loops_over_a_message() -> None:
    too_expensive("{% for a in messages[0].content %}{% for b in messages[0].content %}{% endfor %}{% endfor %}", LONG, WORK)


def test_attack_nested_loops_over_lists() -> None:
    too_expensive("{% set l = messages[0].content | list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}", LONG, WORK)
    # items a loop filter skips are iterated all the same
    too_expensive("{% for a in messages[0].content %}{% for b in messages[0].content if false %}{% endfor %}{% endfor %}", LONG, WORK)


def test_attack_integer_power_chain() -> None:
    too_expensive("{{ 9 ** 1024 ** 1024 ** 16 }}", why=f"has more than {MAX_INT_BITS} bits")


def test_attack_repeated_squaring() -> None:
    too_expensive("{% set ns = namespace(x=9) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
                  why=f"a product of more than {MAX_INT_BITS} bits")


def test_attack_repeated_doubling() -> None:
    too_expensive("{% set ns = namespace(x=3) %}{% for i in range(100000) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
                  why=f"an integer grew past {MAX_INT_BITS} bits")
    too_expensive("{% set ns = namespace(x=3) %}{% for i in range(100000) %}{% set ns.x = 0 - ns.x - ns.x %}{% endfor %}",
                  why=f"an integer grew past {MAX_INT_BITS} bits")


@pytest.mark.parametrize("text", ["{{ 5 | round(-1000000) }}", "{{ 5 | round(-1000000, 'ceil') }}"])
def test_attack_round_to_a_million_digits(text: str) -> None:
    too_expensive(text, why="round() to -1000000 digits")


def test_attack_join_of_a_repeated_list() -> None:
    # 100 references to one 10-million-character string: a 1 GB join
    too_expensive("{{ (['x' * 10000000] * 100) | join }}", why="the join filter could grow past")
    too_expensive("{{ ''.join(['x' * 10000000] * 100) }}", why="str.join() could grow past")
    too_expensive("{{ (['x' * 10000000] * 100) | map('upper') | join }}", why="could grow past")


def test_attack_indent_of_many_lines() -> None:
    too_expensive("{{ ('x\n' * 2000) | indent(1000000) }}", why="the indent filter could grow past")


def test_attack_replace_with_a_long_string() -> None:
    too_expensive("{{ ('x' * 1000) | replace('x', 'y' * 1000000) }}", why="the replace filter could grow past")
    too_expensive("{{ ('x' * 1000).replace('x', 'y' * 1000000) }}", why="str.replace() could grow past")


def test_attack_printing_shared_references() -> None:
    # a list of 40 references to one million-character string prints as 40 MB
    shared = "{% set a = ['x' * 1000000] * 40 %}"
    too_expensive(shared + "{{ a }}", why="printing a value could grow past")
    too_expensive(shared + "{{ a | string }}", why="the string filter could grow past")
    too_expensive(shared + "{{ a | tojson }}", why="the tojson filter could grow past")
    too_expensive(shared + "{{ 'x' ~ a }}", why="~ could grow past")
    too_expensive(shared + "{{ a | trim }}", why="the trim filter could grow past")
    too_expensive(shared + "{% set ns = namespace(a=a) %}{{ ns }}", why="printing a value could grow past")


def test_attack_lists_of_many_items() -> None:
    # a list entry costs a pointer and often an object: 30 million of them are gigabytes
    too_expensive("{{ ('\u4e2d' * 30000000) | list | length }}", why="the list filter could grow past")
    too_expensive("{{ ('a ' * 10000000).split() | length }}", why="str.split() could grow past")
    too_expensive("{{ ('a\n' * 10000000).splitlines() | length }}", why="str.splitlines() could grow past")
    too_expensive("{{ range(-1000000, 1000000) | list | length }}", why="range() could grow past")
    too_expensive("{{ dict.fromkeys(range(-1000000, 1000000)) | length }}", why="range() could grow past")
    # splitting a long message on a marker, as Qwen's templates do, is fine
    assert render("{{ (messages[0].content.split('</think>') | last) | length }}", TWO_LONG) == "1000000"


def test_attack_markup_escapes_what_it_is_given() -> None:
    # |safe makes a Markup, which escapes the other operand: '"' becomes '&#34;'
    too_expensive("{{ '' | safe + '\"' * 30000000 }}", why="adding two values could grow past")
    too_expensive("{{ ('%s' | safe) % ('\"' * 30000000) }}", why="% formatting could grow past")


def test_attack_tojson_separators_and_indent() -> None:
    too_expensive("{{ range(100) | list | tojson(separators=('x' * 1000000, ':')) }}", why="the tojson filter could grow past")
    too_expensive("{% set a = [[[[range(100) | list]]]] * 100 %}{{ a | tojson(indent='x' * 100000) }}",
                  why="the tojson filter could grow past")


def test_attack_format_widths_repeated() -> None:
    too_expensive("{{ ('{0:999999}' * 2000).format(1) }}", why="str.format() could grow past")
    too_expensive("{{ ('%(a)999999s' * 2000) % {'a': 1} }}", why="% formatting could grow past")
    too_expensive("{{ ('%999999s' * 2000) | format(*range(2000)) }}", why="the format filter could grow past")
    too_expensive("{{ ('{0}' * 1000).format('x' * 1000000) }}", why="str.format() could grow past")


def test_attack_str_methods_that_multiply() -> None:
    too_expensive("{{ ('\t' * 100000).expandtabs(1000000) }}", why="str.expandtabs() could grow past")
    too_expensive("{{ ('x' * 100000).translate({120: 'y' * 100000}) }}", why="str.translate() could grow past")
    too_expensive("{{ strftime_now('%c' * 10000000) }}", why="strftime_now() could grow past")


def test_attack_output_of_macros_and_blocks() -> None:
    # block output is joined in memory, out of sight of the prompt's own size check
    loop = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
    for text in (
        "{% macro m() %}" + loop + "{% endmacro %}{% set x = m() %}",
        "{% set x %}" + loop + "{% endset %}",
        "{% filter upper %}" + loop + "{% endfilter %}",
    ):
        too_expensive(text, LONG)


def test_attack_memory_in_total() -> None:
    # each string is under the size limit; together they are gigabytes
    too_expensive("{% set ns = namespace(l=[]) %}{% for i in range(100) %}{% set ns.l = ns.l + ['x' * 30000000] %}{% endfor %}",
                  why="characters allocated in all")


def test_attack_comparisons_of_long_strings() -> None:
    # two equal million-character messages: each comparison reads both
    too_expensive("{% for i in range(1000000) %}{% if messages[0].content == messages[1].content %}{% endif %}{% endfor %}",
                  TWO_LONG, WORK)
    too_expensive("{% for i in range(1000000) %}{% if messages[0].content is eq messages[1].content %}{% endif %}{% endfor %}",
                  TWO_LONG, WORK)
    too_expensive("{% for i in range(1000000) %}{% if 'y' in messages[0].content %}{% endif %}{% endfor %}", TWO_LONG, WORK)


def test_attack_slices_of_a_long_message() -> None:
    too_expensive("{% for i in range(1000000) %}{% set s = messages[0].content[::-1] %}{% endfor %}", TWO_LONG)


def test_attack_filters_over_long_lists() -> None:
    too_expensive("{% for a in messages[0].content %}{{ messages[0].content | list | sort | join }}{% endfor %}", LONG, WORK)
    too_expensive("{% for a in messages[0].content %}{{ (messages[0].content ~ ' ') | title }}{% endfor %}", LONG, WORK)


def test_attack_recursive_loop_is_counted() -> None:
    # a billion iterations, three levels deep
    too_expensive("{% for m in messages recursive %}{% if loop.depth < 3 %}{{ loop(messages) }}{% endif %}{% endfor %}",
                  [{"role": "user", "content": "x"}] * 1000, WORK)


def test_real_templates_render_long_conversations() -> None:
    """No false alarms: every real template renders a 2-million-character
    conversation and a thousand messages within the budget."""
    big = [{"role": "user", "content": "x" * 1_000_000}, {"role": "assistant", "content": "y" * 1_000_000},
           {"role": "user", "content": "z"}]
    many = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " * 20} for i in range(999)]
    for name in TEMPLATES:
        assert ours(name, {"messages": big, "tools": CASES["tools-user"]["tools"]}).count("x") >= 1_000_000
        assert "message 998" in ours(name, {"messages": many})


def test_empty_tool_list_means_no_tools() -> None:
    # Llama's template tests "tools is not none": [] from a client must not switch on tool mode.
    assert ours("llama3.1", {**CASES["user"], "tools": []}) == ours("llama3.1", CASES["user"])
    assert "Environment: ipython" not in ours("llama3.1", {**CASES["user"], "tools": []})
