#!/usr/bin/env bash
# The tests on a machine with only Python 3: makes .venv (or $VENV) if absent, installs,
# then runs the whole suite (arguments replace `tests`, e.g. tests/test_cli.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
python -m pytest -q -n 2 "${@:-tests}"
