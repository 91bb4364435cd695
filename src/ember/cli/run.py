"""`ember` commands: see the module owner's docstring once implemented."""

from __future__ import annotations

from ember.cli.app import app  # noqa: F401
