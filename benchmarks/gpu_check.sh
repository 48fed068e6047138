#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU"): every GPU figure in one run of at most ~8 minutes on one
# H100 / H200. Uses the active virtual environment or .venv when it already has the project, else installs
# it with the project's script (ATOKEN_ALLOW_CUDA=1: a CUDA torch is expected here). On a machine without
# CUDA it runs what it can and prints, for each GPU section, that it was skipped and why.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then source .venv/bin/activate; fi
if ! python -c "import atoken, ray, deepspeed" 2>/dev/null; then
  ATOKEN_ALLOW_CUDA=1 bash scripts/install.sh
  if [[ -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU"
exec timeout "${ATOKEN_GPU_CHECK_TIMEOUT:-470}" python benchmarks/gpu_check.py "$@"
