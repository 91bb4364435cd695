"""Reasoning ("thinking") output, as Ollama separates it.

Thinking models (Qwen3, DeepSeek-R1 distills) write their reasoning between
tags such as ``<think>`` and ``</think>`` before the answer. Like Ollama, the
tags are learned from the model's own template: a conversation whose
assistant turn carries a probe ``thinking`` text is rendered, and the text
the template writes right before and right after the probe are the opening
and closing tags. A template that renders no thinking cannot think.

:class:`ThinkingParser` splits streamed text into (thinking, content) as it
comes, holding back only what could still be the start of a tag, so a tag
split across chunks is recognised.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ember.errors import OptionError, TemplateError
from ember.templates.tools import per_template

if TYPE_CHECKING:
    from . import ChatTemplate

__all__ = ["ThinkingParser", "check_think", "think_level", "thinking_tags"]

LEVELS = ("low", "medium", "high")
_PROBE_THINKING = "ember_probe_thinking"
_PROBE_CONTENT = "ember_probe_answer"
_KNOWN = ("<think>", "</think>")
_TAG_AT_END = re.compile(r"(<[^<>\s]+>|\[[^\[\]\s]+\])$")
_tag_cache: dict[tuple[str, str], tuple[str, str] | None] = {}


def check_think(value: Any) -> bool | str | None:
    """Ollama's ``think``: true/false or "low"/"medium"/"high" ("max" is
    "high"); None when not set. Anything else is an OptionError."""
    if value is None or isinstance(value, bool):
        return value
    if value == "max":
        return "high"
    if isinstance(value, str) and value in LEVELS:
        return value
    raise OptionError(f'invalid think value: {value!r} (must be "high", "medium", "low", "max", true, or false)')


def think_level(value: bool | str | None) -> str:
    """The template's ``.ThinkLevel``: the level asked for, "medium" for plain true."""
    if isinstance(value, str):
        return value
    return "medium" if value else ""


def thinking_tags(template: ChatTemplate | None) -> tuple[str, str] | None:
    """``(opening, closing)`` tags around the reasoning in ``template``'s
    output, or None when the template renders no thinking."""
    if template is None:
        return None
    return per_template(_tag_cache, template, _derive_tags)


def _derive_tags(template: ChatTemplate) -> tuple[str, str] | None:
    user = {"role": "user", "content": "ember_probe_user"}
    answer = {"role": "assistant", "content": _PROBE_CONTENT, "thinking": _PROBE_THINKING}
    try:
        text = template.render_messages([user, answer], add_generation_prompt=False, think=True)
    except TemplateError:
        return None
    if _PROBE_THINKING not in text:
        # Templates that drop old reasoning (DeepSeek-R1's) still name the tags.
        return _KNOWN if _KNOWN[1] in template.text else None
    at = text.find(_PROBE_THINKING)
    end = text.find(_PROBE_CONTENT, at + len(_PROBE_THINKING)) if at >= 0 else -1
    if at < 0 or end < 0:
        return None
    before = text[:at].rstrip()
    # The opening tag: the markup right before the probe ("<think>"), else its last word.
    m = _TAG_AT_END.search(before)
    opening = m.group(0) if m else (before.rsplit(None, 1)[-1] if before else "")
    closing = text[at + len(_PROBE_THINKING) : end].strip()
    if not opening or not closing or "ember_probe_user" in opening:
        return None
    return opening, closing


class ThinkingParser:
    """Split a reply streamed in pieces into thinking and content.

    Leading whitespace and an opening tag start the thinking; text that
    starts otherwise means the model did not think. Whitespace right after
    either tag is dropped, as Ollama does.
    """

    def __init__(self, opening: str, closing: str, *, started: bool = False) -> None:
        self.opening = opening
        self.closing = closing
        self._buf = ""
        # "open": looking for the opening tag; "think": inside; "done": after it.
        self._state = "think" if started else "open"
        self._eat_space = started

    @property
    def undecided(self) -> bool:
        """Whether the reply has not yet shown if it reasons (only space or part of the opening tag so far)."""
        return self._state == "open"

    @property
    def answering(self) -> bool:
        """Whether the reasoning is over, or the reply did not reason: what follows is the answer."""
        return self._state == "done"

    def add(self, text: str) -> tuple[str, str]:
        """(thinking, content) that ``text`` makes certain."""
        self._buf += text
        thinking: list[str] = []
        content: list[str] = []
        while self._step(thinking, content):
            pass
        return "".join(thinking), "".join(content)

    def finish(self) -> tuple[str, str]:
        """(thinking, content) still held back, at the end of the reply."""
        rest, self._buf = self._buf, ""
        if self._state == "think":
            return rest, ""
        return "", rest if self._state == "done" or rest.strip() else ""

    def _step(self, thinking: list[str], content: list[str]) -> bool:
        """Consume what the buffer decides; True when another step may decide more."""
        if self._state == "open":
            trimmed = self._buf.lstrip()
            if trimmed.startswith(self.opening):
                self._buf = trimmed[len(self.opening) :]
                self._state, self._eat_space = "think", True
                return True
            if not trimmed or self.opening.startswith(trimmed):
                return False  # whitespace or part of the tag so far: wait
            self._state = "done"
            content.append(self._buf)
            self._buf = ""
            return False
        if self._eat_space:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._eat_space = False
        if self._state == "done":
            content.append(self._buf)
            self._buf = ""
            return False
        at = self._buf.find(self.closing)
        if at >= 0:
            thinking.append(self._buf[:at])
            self._buf = self._buf[at + len(self.closing) :]
            self._state, self._eat_space = "done", True
            return True
        keep = _overlap(self._buf, self.closing)
        thinking.append(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False


def _overlap(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
