"""Chat templates: Ollama's Go TEMPLATE syntax and Jinja chat templates
behind one interface.

``ChatTemplate.parse(text)`` tells the two apart by syntax, so a Modelfile
TEMPLATE may be either, and a GGUF's ``tokenizer.chat_template`` renders as
itself instead of being matched against a list of known templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ember.errors import TemplateError

from .jinja import JinjaChatTemplate
from .ollama import OllamaTemplate
from .thinking import think_level, thinking_tags
from .tools import parse_tool_calls, split_tool_calls

__all__ = ["ChatTemplate", "TemplateError", "parse_tool_calls", "split_tool_calls"]

_JINJA_BLOCK = re.compile(r"\{%|\{#")
# Actions only Go templates have: field/variable access or Go keywords right
# after the opening delimiter. Decides whose parse error a user sees when a
# template parses as neither.
_GO_ACTION = re.compile(r"\{\{-?\s*(\.|\$|/\*|(if|range|with|end|else|template|define|block|len|index|eq|ne|and|or|not|printf|json)\b)")


@dataclass
class ChatTemplate:
    """A parsed chat template; ``kind`` says which syntax it is."""

    kind: Literal["go", "jinja"]
    text: str
    _impl: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> ChatTemplate:
        """Parse ``text`` as Jinja when it has ``{% %}``/``{# #}`` blocks or is
        only valid as Jinja, otherwise as a Go template. TemplateError (with a
        line number) when it parses as neither."""
        if not isinstance(text, str):
            raise TemplateError(f"a template must be text, got {type(text).__name__}")
        if _JINJA_BLOCK.search(text):
            return cls("jinja", text, JinjaChatTemplate(text))
        try:
            return cls("go", text, OllamaTemplate(text))
        except TemplateError as go_error:
            # Only-expression Jinja templates such as "{{ bos_token }}{{ messages[0]['content'] }}"
            try:
                impl = JinjaChatTemplate(text)
            except TemplateError as jinja_error:
                raise (go_error if _GO_ACTION.search(text) else jinja_error) from None
            return cls("jinja", text, impl)

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders tool definitions at all (Ollama
        refuses tool requests for templates that do not)."""
        return bool(self._impl.supports_tools)

    @property
    def supports_insert(self) -> bool:
        """Whether the template handles a suffix (fill-in-the-middle)."""
        return self.kind == "go" and bool(self._impl.supports_insert)

    @property
    def supports_thinking(self) -> bool:
        """Whether the template shows reasoning: its thinking tags were found
        (see :mod:`ember.templates.thinking`)."""
        return self.thinking_tags is not None

    @property
    def capabilities(self) -> list[str]:
        """Ollama's names for what this template can take."""
        return [name for name, ok in (("tools", self.supports_tools), ("insert", self.supports_insert),
                                      ("thinking", self.supports_thinking)) if ok]

    def render_messages(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        think: bool | str | None = None,
    ) -> str:
        """The prompt for a chat (Ollama's /api/chat). Go templates follow
        Ollama's rules (``add_generation_prompt``, ``bos_token`` and
        ``eos_token`` do not apply: the template decides); Jinja templates get
        Hugging Face's context, plus ``enable_thinking`` (and
        ``reasoning_effort`` for a level) when ``think`` is set."""
        if self.kind == "go":
            return str(self._impl.execute(messages, tools=tools, **_think_values(think)))
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = bool(think)
        if isinstance(think, str):
            extra["reasoning_effort"] = think
        return str(
            self._impl.render(
                messages,
                tools=tools or None,  # an empty list means no tools, not "tools mode" with none
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                extra=extra,
            )
        )

    @property
    def thinking_tags(self) -> tuple[str, str] | None:
        """The tags around reasoning in this template's output, or None when
        it renders no thinking (the model cannot think)."""
        return thinking_tags(self)

    def render_prompt(
        self, prompt: str, *, system: str = "", response: str = "", suffix: str = "", think: bool | str | None = None
    ) -> str:
        """The prompt for a completion (Ollama's /api/generate): the system
        message (if any) and the user's prompt; a ``response`` is an assistant
        reply to continue; ``suffix`` asks for fill-in-the-middle."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        if self.kind == "go":
            if suffix:
                if not self.supports_insert:
                    raise TemplateError("this model's template does not support a suffix (insert)")
                return str(self._impl.execute(prompt=prompt, suffix=suffix, **_think_values(think)))
            if response:
                messages.append({"role": "assistant", "content": response})
            return str(self._impl.execute(messages, **_think_values(think)))
        if suffix:
            raise TemplateError("this model's chat template does not support a suffix (insert)")
        if not response:
            return self.render_messages(messages, think=think)
        return _continue_final(self._impl, messages, response)


def _think_values(think: bool | str | None) -> dict[str, Any]:
    """``think`` as the Go template's .Think/.ThinkLevel/.IsThinkSet inputs."""
    return {"think": None if think is None else bool(think), "think_level": think_level(think)}


def _continue_final(impl: JinjaChatTemplate, messages: list[dict[str, Any]], response: str) -> str:
    """Render with a final assistant message left open, as Hugging Face's
    ``continue_final_message`` does: cut the text right after the reply."""
    marker = "\ue000EMBER_CONTINUE\ue000"
    rendered = impl.render(
        [*messages, {"role": "assistant", "content": response + marker}], add_generation_prompt=False
    )
    at = rendered.rfind(marker)
    if at < 0:
        raise TemplateError("the chat template drops the assistant reply, so it cannot be continued")
    return rendered[:at]

