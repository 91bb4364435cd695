"""Request bodies of the Ollama and OpenAI APIs (pydantic), for validation and
the OpenAPI document. Unknown fields are ignored, as both servers do; values
are then checked again where they are used (options by ember.options)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.request import MAX_TOP_LOGPROBS

Format = str | dict[str, Any] | None
# Checked by ember.options.parse_duration (a duration string or seconds;
# JSON true/false are refused there, not coerced to 1/0).
KeepAlive = Any
# How many most likely alternatives per token (OpenAI's bound; a 400 naming the field past it).
TopLogprobs = Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --- Ollama -----------------------------------------------------------------
class GenerateRequest(_Body):
    model: str = ""
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool = True
    raw: bool = False
    format: Format = None
    images: list[str] | None = None
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs = None
    debug_render_only: bool = Field(False, alias="_debug_render_only")


class Message(_Body):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    role: str
    content: str | list[dict[str, Any]] | None = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    model: str = ""
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    format: Format = None
    stream: bool = True
    keep_alive: KeepAlive = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs = None
    debug_render_only: bool = Field(False, alias="_debug_render_only")


class EmbedRequest(_Body):
    model: str = ""
    input: str | list[str] = ""
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    dimensions: int | None = None


class EmbeddingsRequest(_Body):
    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class NameRequest(_Body):
    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def target(self) -> str:
        return (self.model or self.name or "").strip()


class CopyRequest(_Body):
    source: str
    destination: str


class PullRequest(_Body):
    model: str | None = None
    name: str | None = None
    insecure: bool = False
    stream: bool = True

    def target(self) -> str:
        return (self.model or self.name or "").strip()


class CreateRequest(_Body):
    model: str | None = None
    name: str | None = None
    # Ollama's JSON form
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None
    quantize: str | None = None
    # The older Modelfile form
    modelfile: str | None = None
    path: str | None = None  # where the client read its Modelfile: ignored, the server reads no paths
    stream: bool = True

    def target(self) -> str:
        return (self.model or self.name or "").strip()


# --- OpenAI -----------------------------------------------------------------
class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    model: str = ""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs = None
    debug_render_only: bool = Field(False, alias="_debug_render_only")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = ""
    suffix: str | None = None
    echo: bool = False
    logprobs: TopLogprobs = None  # the legacy form: how many alternatives (0: the chosen token's only)


class EmbeddingRequest(_Body):
    model: str = ""
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# --- Anthropic (Messages API) ------------------------------------------------
class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    model: str = ""
    max_tokens: int | None = None  # required by /v1/messages, not by count_tokens
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


# --- OpenAI Responses API ----------------------------------------------------
class ResponsesRequest(_Body):
    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: str | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: TopLogprobs = None
