#!/usr/bin/env bash
# The main job: installs (scripts/install.sh), then runs `atoken run` on embedded defaults.
# Extra args are Hydra overrides for `atoken run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [[ -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
exec atoken run "$@"
