"""Errors users can cause. Every one carries a message that names the file, field
or line and says what to do; the CLI prints it on one line and exits 1, the
server answers ``{"error": message}`` with ``status``."""

from __future__ import annotations


class EmberError(Exception):
    """Base of every error Ember raises on purpose."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidFileError(EmberError):
    """A file (GGUF, safetensors, config, tokenizer) is missing, truncated or malformed."""


class ModelfileError(EmberError):
    """A Modelfile does not parse or names something that does not exist."""


class TemplateError(EmberError):
    """A chat template (Go or Jinja) does not parse or fails to render."""


class InvalidNameError(EmberError):
    """A model name breaks Ollama's naming rules."""


class DigestMismatchError(InvalidFileError):
    """A file's sha256 is not the digest it was stored or downloaded under."""

    def __init__(self, message: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class ModelNotFoundError(EmberError):
    """No model of that name in the registry and no such file."""

    status = 404


class OptionError(EmberError):
    """An unknown option name or a value of the wrong type or range."""


class ConversionError(EmberError):
    """A Hugging Face checkpoint cannot be converted (unsupported, inconsistent)."""


class QuantizationError(EmberError):
    """A quantization type or its arguments are wrong, or llama.cpp refused."""


class EngineError(EmberError):
    """llama.cpp could not load a model or create a context."""

    status = 500


class RunnerError(EngineError):
    """A model's runner process died (a llama.cpp abort, a crash, the OOM
    killer): only that model's requests fail; the next request loads it again."""


class ContextOverflowError(EmberError):
    """A prompt does not fit in the context window."""


class DownloadError(EmberError):
    """A pull failed: unreachable hub, missing repository or file."""

    status = 502


class RemoteModelNotFoundError(DownloadError):
    """The registry or hub has no such model or tag."""

    status = 404


class QueueFullError(EmberError):
    """The server's request queue is full; retry later."""

    status = 503


class CancelledError(EmberError):
    """A generation was cancelled (client gone, model unloaded)."""

    status = 499


class ImageError(EmberError):
    """An image is corrupt, too large, of an unsupported format, or sent to a
    model that cannot see."""


class WorkerError(EmberError):
    """An RPC worker (``ember worker``) cannot be reached or used."""

    status = 502
class BodyTooLargeError(EmberError):
    """A request body is larger than the server accepts (EMBER_MAX_BODY_SIZE)."""

    status = 413
