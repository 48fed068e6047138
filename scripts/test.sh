#!/usr/bin/env bash
# The test command: installs (scripts/install.sh), then two lanes: the unit tests (pure logic, seconds;
# the run stops at the first failure) and, only if they pass, the integration tests (real Ray, DeepSpeed,
# MLflow, S3, decord, Gaussian rendering). Extra args go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [[ -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
echo "[test] lane 1/2: unit"
python -m pytest tests -m "unit" -x -q "$@"
echo "[test] lane 2/2: integration"
exec python -m pytest tests -m "not unit" -q --durations=15 "$@"
