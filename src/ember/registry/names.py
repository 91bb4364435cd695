"""Model names with Ollama's rules: ``[host/][namespace/]model[:tag]``.

Defaults are ``registry.ollama.ai``, ``library`` and ``latest``; lookups are
case-insensitive. Names whose host is Hugging Face's or ModelScope's are hub
references (:func:`parse_hub_ref`): ``hf.co/USER/REPO[:QUANT]``. A name becomes a path under ``manifests/`` so the rules are
also a security boundary: only letters, digits, ``_``, ``-`` and ``.`` (no
``..``; no ``.`` in a namespace; ``:`` only for a host's port), and every part
starts with a letter, digit or ``_``, so no part is ever ``.``, ``..`` or empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ember import settings
from ember.errors import InvalidNameError

DEFAULT_HOST = "registry.ollama.ai"
HF_HOSTS = ("hf.co", "huggingface.co", "www.huggingface.co")
MS_HOSTS = ("modelscope.cn", "www.modelscope.cn", "modelscope.co")
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama's limits: a host may be long (it can carry a port), other parts 80.
MAX_HOST = 350
MAX_PART = 80

_PART = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[0-9]{1,5})?"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"),
}


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """Ollama's short form: host and namespace left out when they are the defaults;
        the tag is always shown (``qwen2.5:7b``, ``user/m:latest``, ``hf.co/u/r:Q4_K_M``)."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    def key(self) -> tuple[str, ...]:
        """Case-insensitive identity."""
        return tuple(p.lower() for p in self.parts())

    def manifest_relpath(self) -> Path:
        return Path(self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return self.display


def parse_name(text: str) -> ModelName:
    """Parse and validate a model name, filling Ollama's defaults.

    Raises :class:`InvalidNameError` with a message that says which part is
    wrong and what is allowed.
    """
    if not isinstance(text, str):
        raise InvalidNameError(f"invalid model name {text!r}: expected text")
    raw = text.strip()
    s = raw
    for scheme in ("http://", "https://"):
        if s.lower().startswith(scheme):
            s = s[len(scheme):]
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    if not s:
        raise InvalidNameError("invalid model name '': a name is [host/][namespace/]model[:tag], e.g. qwen2.5:7b")
    if len(s) > MAX_HOST + 3 * MAX_PART + 3:
        raise InvalidNameError(f"invalid model name {shown!r}: too long ({len(s)} characters)")
    pieces = s.split("/")
    if len(pieces) > 3:
        raise InvalidNameError(
            f"invalid model name {shown!r}: at most host/namespace/model:tag (found {len(pieces) - 1} slashes)"
        )
    last = pieces[-1]
    tag = DEFAULT_TAG
    if ":" in last:
        last, tag = last.rsplit(":", 1)
        if not tag:
            raise InvalidNameError(f"invalid model name {shown!r}: empty tag after ':' (leave out ':' for 'latest')")
    model = last
    namespace = pieces[-2] if len(pieces) >= 2 else DEFAULT_NAMESPACE
    host = pieces[-3] if len(pieces) == 3 else DEFAULT_HOST
    for kind, value in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
        _check_part(shown, kind, value)
    return ModelName(host, namespace, model, tag)


def _check_part(shown: str, kind: str, value: str) -> None:
    limit = MAX_HOST if kind == "host" else MAX_PART
    if not value:
        raise InvalidNameError(f"invalid model name {shown!r}: empty {kind}")
    if len(value) > limit:
        raise InvalidNameError(f"invalid model name {shown!r}: {kind} too long ({len(value)} characters; at most {limit})")
    if ".." in value:
        raise InvalidNameError(f"invalid model name {shown!r}: '..' is not allowed in a {kind}")
    if not _PART[kind].fullmatch(value):
        allowed = "letters, digits, '_', '-'" + ("" if kind == "namespace" else " and '.'")
        raise InvalidNameError(
            f"invalid model name {shown!r}: {kind} {value!r} may contain only {allowed}, starting with a letter, digit or '_'"
        )


def is_valid_name(text: str) -> bool:
    try:
        parse_name(text)
    except InvalidNameError:
        return False
    return True


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face or ModelScope repository to pull."""

    source: str  # "hf" or "modelscope"
    repo: str  # user/repo
    quant: str | None
    name: str  # registry name: hf.co/user/repo:quant or modelscope.cn/user/repo:quant


def _strip_scheme(text: str) -> str:
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            return text[len(scheme):]
    return text


def is_hub_ref(text: str) -> bool:
    """A reference whose host is Hugging Face's or ModelScope's."""
    return _strip_scheme(text.strip()).split("/", 1)[0].lower() in HF_HOSTS + MS_HOSTS


def parse_hub_ref(text: str) -> HubRef:
    """``hf.co/USER/REPO[:QUANT]`` (also ``huggingface.co/...``) or
    ``modelscope.cn/USER/REPO[:QUANT]``; ``EMBER_PULL_SOURCE=modelscope``
    sends Hugging Face references to ModelScope."""
    parts = _strip_scheme(text.strip()).split("/")
    host = parts[0].lower()
    if host not in HF_HOSTS + MS_HOSTS or len(parts) != 3:
        raise InvalidNameError(f"cannot pull {text!r} from a hub: use hf.co/USER/REPO[:QUANT] or modelscope.cn/USER/REPO[:QUANT]")
    user, repo_tag = parts[1:]
    repo, _, quant = repo_tag.partition(":")
    if ":" in repo_tag and not quant:
        raise InvalidNameError(f"cannot pull {text!r}: empty quantization after ':'")
    source = "modelscope" if host in MS_HOSTS or settings.pull_source() == "modelscope" else "hf"
    name = f"{'hf.co' if host in HF_HOSTS else 'modelscope.cn'}/{user}/{repo}:{quant or 'latest'}"
    parse_name(name)  # validates (bad characters, '..', lengths)
    return HubRef(source, f"{user}/{repo}", quant or None, name)
