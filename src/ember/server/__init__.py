"""The HTTP server: Ollama's and OpenAI's APIs over one continuous-batching
scheduler per loaded model (see app.py, manager.py)."""

from __future__ import annotations

from ember.server.app import create_app
from ember.server.manager import ModelManager

__all__ = ["ModelManager", "create_app"]
