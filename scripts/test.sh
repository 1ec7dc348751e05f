#!/usr/bin/env bash
# The default test run: CPU-only, slow and GPU tests deselected (pytest -m slow runs the slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest "$@"
