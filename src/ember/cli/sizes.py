"""Sizes as the command line reads and prints them. Apart from
:mod:`ember.cli.common` because it needs no rich: ``ember list`` imports it."""

from __future__ import annotations

import re

from ember.errors import OptionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '1024' -> bytes (powers of 1000 like llama.cpp's
    gguf-split for K/M/G without 'i', powers of 1024 with 'i')."""
    m = _SIZE.match(text)
    if not m:
        raise OptionError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 2G)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    base = 1024 if suffix.startswith("i") else 1000
    power = " KMGT".index(unit) if unit else 0
    return int(number * base**power)


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
