"""`ember run` as a user drives it: one-shot answers, stdin, bad input, and the
interactive chat in a real terminal (pexpect)."""

from __future__ import annotations

import os
import time

import pexpect
import pytest
from cli_fixtures import EMBER, run_ember
from engine_fixtures import GREEDY, copy_demo, reference_greedy

from ember.demo import demo_model_path


def _greedy_args(n: int) -> list[str]:
    return [f"--param={k}={v}" for k, v in {**GREEDY, "num_predict": n}.items()]


def test_one_shot_matches_llama_cpp_greedy():
    import llama_cpp

    prompt = "The three primary colours are"
    r = run_ember("run", "demo", prompt, *_greedy_args(24), "--verbose")
    assert r.returncode == 0, r.stderr
    ids = reference_greedy(prompt, 24)
    llm = llama_cpp.Llama(model_path=str(demo_model_path()), n_ctx=64, verbose=False, vocab_only=True)
    expected = llm.detokenize(ids).decode("utf-8")
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")
    for line in ("load duration:", "prompt eval count:    6 token(s)", "prompt eval rate:", "eval count:           24 token(s)", "eval rate:",
                 "draft count:", "draft accepted:", "KV cache"):
        assert line in r.stderr
    assert "Traceback" not in r.stderr


def test_stdin_is_prepended_to_the_prompt():
    r = run_ember("run", "demo", "--raw", *_greedy_args(8), input="The capital of France is")
    assert r.returncode == 0, r.stderr
    plain = run_ember("run", "demo", "The capital of France is", "--raw", *_greedy_args(8))
    assert r.stdout == plain.stdout and r.stdout.strip()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "/nonexistent/model.gguf", "hi"], "not found"),
        (["run", "demo", "hi", "--param", "temprature=0"], "unknown parameter 'temprature'"),
        (["run", "demo", "hi", "--param", "top_k=many"], "needs an integer"),
        (["run", "demo", "hi", "--param", "num_ctx=1000000", "--param", "kv_cache_type=f32"], "KV cache"),
        (["run", "demo", "hi", "--param", "num_ctx=100000000"], "must be between"),
        (["run", "demo", "hi", "--param", "temperature"], "NAME=VALUE"),
    ],
)
def test_bad_input_is_one_line(args, needle):
    r = run_ember(*args)
    assert r.returncode == 1
    assert needle in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_not_a_gguf_and_corrupted_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    r = run_ember("run", str(bad), "hi")
    assert r.returncode == 1 and "not a GGUF" in r.stderr and "Traceback" not in r.stderr
    cut = copy_demo(tmp_path / "cut.gguf")
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    r = run_ember("run", str(cut), "hi")
    assert r.returncode == 1 and str(cut) in r.stderr and r.stderr.count("\n") == 1


def _chat(*extra: str) -> pexpect.spawn:
    child = pexpect.spawn(EMBER, ["run", "demo", *extra], encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"})
    child.expect_exact(">>> ")
    return child


def test_interactive_chat_commands_multiline_and_bye():
    child = _chat("--param", "temperature=0", "--param", "repeat_penalty=1", "--param", "num_predict=6")
    child.sendline("/set parameter num_predict 3")
    child.expect_exact("Set parameter 'num_predict' to '3'")
    child.expect_exact(">>> ")
    child.sendline("/show parameters")
    child.expect(r"num_predict\s+3")
    child.expect_exact(">>> ")
    child.sendline('"""The capital')
    child.expect_exact("... ")
    child.sendline('of France is"""')
    child.expect_exact(">>> ")
    reply = child.before
    assert reply.strip()  # the model answered the two-line message
    child.sendline("/show template")
    child.expect_exact("No template was specified for this model.")
    child.sendline("/set system You are terse.")
    child.expect_exact("Set system message.")
    child.sendline("/show system")
    child.expect_exact("You are terse.")
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.sendline("/help")
    child.expect_exact("/set parameter")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_ctrl_c_stops_the_reply_and_chat_continues():
    child = _chat("--param", "num_predict=2000", "--param", "num_ctx=4096")
    child.sendline("Tell me a very long story about a dragon.")
    child.expect(r"\w+", timeout=60)  # streaming has started
    time.sleep(1.0)
    child.sendintr()
    child.expect_exact(">>> ", timeout=120)
    child.sendline("/set parameter num_predict 2")
    child.expect_exact("Set parameter")
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact(">>> ", timeout=60)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_reverse_prompt_hands_control_back():
    child = _chat_rp()
    child.sendline("你好")
    child.expect_exact("用户：", timeout=120)
    child.sendeof()
    child.expect(pexpect.EOF)


def _chat_rp() -> pexpect.spawn:
    child = pexpect.spawn(
        EMBER,
        ["run", "demo", "--reverse-prompt", "用户：", "--param", "num_predict=16", "--system", "以下是用户和助手的对话。"],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "TERM": "dumb"},
    )
    child.expect_exact("用户：")
    return child


def test_inspect_memory_reports_kv_cache_for_the_chosen_context():
    import json

    path = str(demo_model_path())
    small = json.loads(run_ember("inspect", path, "--memory", "--json", "--param", "num_ctx=1024").stdout)["memory"]
    big = json.loads(run_ember("inspect", path, "--memory", "--json", "--param", "num_ctx=4096").stdout)["memory"]
    assert big["kv_cache_bytes"] == 4 * small["kv_cache_bytes"] > 0
    assert small["model_bytes"] == big["model_bytes"] > 200_000_000
    assert small["compute_bytes"] > 0 and small["rss_bytes"] > 0
    r = run_ember("inspect", path, "--memory", "--param", "temperature=1")
    assert r.returncode == 1 and "load options" in r.stderr


def test_think_flags_show_hide_or_turn_off_the_reasoning(models_dir, tmp_path):
    """A thinking model's reasoning is framed as ``ollama run`` frames it;
    --hidethinking prints the answer only; --no-think renders no <think>."""
    from server_fixtures import THINK_TEMPLATE

    from ember.api import Model
    from ember.cli.run import THINKING_CLOSE, THINKING_OPEN

    (tmp_path / "Modelfile").write_text(f'FROM {demo_model_path()}\nTEMPLATE """{THINK_TEMPLATE}"""\n')
    run_ember("create", "thinker", "-f", tmp_path / "Modelfile", check=True)
    question = "Capital of France?"
    with Model("thinker") as m:
        r = m.chat([{"role": "user", "content": question}], **GREEDY, num_predict=12)
        plain = m.chat([{"role": "user", "content": question}], **GREEDY, num_predict=12, think=False)
    assert r.thinking.strip() and not plain.thinking and plain.text.strip()
    args = ("run", "thinker", question, *_greedy_args(12))
    shown = run_ember(*args, check=True).stdout
    assert shown.startswith(THINKING_OPEN) and THINKING_CLOSE in shown
    assert shown[len(THINKING_OPEN) : shown.index(THINKING_CLOSE)].strip() == r.thinking.strip()
    assert shown[shown.index(THINKING_CLOSE) + len(THINKING_CLOSE) :].strip() == r.text.strip()
    hidden = run_ember(*args, "--hidethinking", check=True).stdout
    assert "Thinking..." not in hidden and hidden.strip() == r.text.strip()
    off = run_ember(*args, "--no-think", check=True).stdout
    assert "Thinking..." not in off and off.strip() == plain.text.strip()
    bad = run_ember("run", demo_model_path(), "Hi", "--think")
    assert bad.returncode == 1 and "does not support thinking" in bad.stderr and "Traceback" not in bad.stderr
