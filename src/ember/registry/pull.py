"""``ember pull`` and ``/api/pull``: where a reference is pulled from.

* ``hf.co/USER/REPO[:QUANT]``, ``huggingface.co/...``, ``modelscope.cn/...``:
  the hub's GGUF files, or its checkpoint converted (:mod:`ember.registry.hub`).
* ``demo``: the bundled demo model, no network (:mod:`ember.registry.bundled`).
* Anything else is an Ollama name, ``[host/][namespace/]model[:tag]``, pulled
  with Ollama's registry protocol (:mod:`ember.registry.remote`): ``llama3.2``,
  ``qwen2.5:7b`` and ``user/model:tag`` from Ollama's public registry (or the
  mirror in ``EMBER_REGISTRY``), ``host[:port]/namespace/model:tag`` from that
  host over https (``http://host/...`` with ``insecure``, as in Ollama).
  So a bare ``user/repo`` means what it means to Ollama; ask for Hugging Face
  with ``hf.co/user/repo``.
"""

from __future__ import annotations

from ember.errors import InvalidNameError
from ember.progress import ProgressCallback
from ember.registry import bundled
from ember.registry.core import ResolvedModel, from_manifest
from ember.registry.names import is_hub_ref, parse_name


def pull_model(ref: str, *, insecure: bool = False, progress: ProgressCallback | None = None) -> ResolvedModel:
    """Download ``ref`` (see the module doc) and register it; returns the model.
    ``progress`` gets Ollama's status lines (``success`` is the caller's)."""
    # lazy: the network side loads on the first pull: httpx and huggingface_hub
    # take about half a second to import, which create, show, cp, rm and the
    # server would pay at start-up.
    from ember.registry import hub, remote

    text = ref.strip()
    if is_hub_ref(text):
        return from_manifest(hub.pull(text, progress))
    name = parse_name(text)
    if bundled.is_demo(name):
        return from_manifest(bundled.register())
    scheme = "https"
    if text.lower().startswith("http://"):
        if not insecure:
            raise InvalidNameError(f"cannot pull {text!r} over plain http without insecure (ember pull --insecure)")
        scheme = "http"
    return from_manifest(remote.pull(name, scheme=scheme, progress=progress))
