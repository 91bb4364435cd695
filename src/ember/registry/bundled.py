"""The bundled demo model (:mod:`ember.demo`) as a normal registry model, ``demo``.

When it is registered:
- on a registry's first listing (``ember list``, ``/api/tags``, ``/v1/models``),
  so a fresh install lists it;
- whenever the name ``demo`` is asked for and missing: ``ember run demo``,
  ``ember show demo``, ``ember cp demo x``, a Modelfile ``FROM demo``, the APIs,
  and ``ember pull demo`` (which needs no network).

``ember rm demo`` deletes it like any model; a marker file (``.demo-offered``)
keeps later listings from bringing it back until it is asked for by name.

Its blob is the package's assembled GGUF, hard-linked into ``blobs/`` (a
reflink, else a copy, where the cache is on another file system); the digest
is the package's published sha256, so nothing is read to register it.
"""

from __future__ import annotations

import contextlib
import os

from ember.demo import DEMO_DIGEST, DEMO_NAME, demo_model_path
from ember.errors import EmberError
from ember.registry import assemble, ggufmeta, store
from ember.registry.names import ModelName, parse_name

DEMO = parse_name(DEMO_NAME)


def is_demo(name: ModelName) -> bool:
    return name.key() == DEMO.key()


def is_demo_text(text: str) -> bool:
    """``demo``, ``demo:latest`` or any other spelling of the demo's name."""
    try:
        return is_demo(parse_name(text))
    except EmberError:
        return False


def register() -> store.Manifest:
    """Register (or restore) the demo model; return its manifest."""
    path = demo_model_path()
    info = ggufmeta.read_info(path)
    with store.writing():
        size = store.add_known_file(path, DEMO_DIGEST)
        assemble.write_model(DEMO, [store.Layer(store.MEDIA_MODEL, DEMO_DIGEST, size)], assemble.model_config([info]))
    (store.root() / store.OFFERED_MARKER).touch()
    found = store.find_manifest_path(DEMO)
    if found is None:  # pragma: no cover - removed by a concurrent rm
        raise EmberError("the demo model was removed while it was being registered; try again")
    # Dated like the installed file, so a listing's first entry stays the user's newest model.
    stamp = path.stat().st_mtime
    os.utime(found, (stamp, stamp))
    return store.read_manifest(found)


def offer() -> None:
    """Register the demo in a registry that never had it (its first listing,
    :func:`ember.registry.listing.list_models`). A registry that cannot be
    written to is listed without it."""
    with contextlib.suppress(OSError, EmberError):
        register()
