#!/usr/bin/env bash
# The test command: installs (scripts/install.sh), then runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [[ -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
exec python -m pytest tests "$@"
