#!/usr/bin/env bash
# Runs ruff and the test suite in .venv (after scripts/install.sh test). Installs Debian's
# Chromium for the web page tests when it is missing and we may use apt.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; web page tests will fail" >&2
fi
.venv/bin/ruff check --quiet  # style first: a lint error fails the run in seconds
exec .venv/bin/python -m pytest "$@"
