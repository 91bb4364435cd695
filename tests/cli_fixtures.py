"""The one way tests start the ``ember`` command: this virtual environment's
console script in a subprocess (what a user runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EMBER = str(Path(sys.executable).with_name("ember"))


def run_ember(
    *args: str | Path,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 180,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``ember ARGS`` with this process's environment plus ``env``; stdin is
    ``input`` (empty unless given, so nothing waits on a terminal). ``check``:
    a failure is an AssertionError that shows the command's stderr."""
    r = subprocess.run(
        [EMBER, *map(str, args)], input=input if input is not None else "", capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd, check=False,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"ember {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr}")
    return r
