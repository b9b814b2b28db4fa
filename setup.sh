#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with everything the app, the CLI and the tests need
# (requirements-dev.txt: the runtime pins of requirements.txt plus the test tools).
# Usage: bash setup.sh            (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $PYTHON is not Python >= 3.11 (numpy 2.4 needs it); run PYTHON=python3.11 bash setup.sh" >&2
    exit 1
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -r requirements-dev.txt
"$VENV/bin/pip" install --quiet --no-deps -e .

# Headless Chromium for the browser test (Debian package; the test skips with a clear reason when it is absent).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "note: could not install chromium; the browser test will be skipped" >&2
fi
echo "ready: $VENV/bin/python app.py  |  $VENV/bin/python -m pytest -q"
