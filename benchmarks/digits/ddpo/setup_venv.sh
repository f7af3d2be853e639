#!/usr/bin/env bash
# The virtual environment in which TRL 0.23.1's real `DDPOTrainer` runs (benchmarks/digits/ddpo/.venv): TRL removed
# DDPO in 0.24, so it needs the diffusers / transformers of its era, not the main environment's. Idempotent: a venv
# that already imports the pinned versions is left as it is.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3.11}"
PINS=(
  "trl==0.23.1"
  "diffusers==0.35.2"
  "transformers==4.56.2"
  "accelerate==1.10.1"
  "peft==0.17.1"
  "torch==2.13.0+cpu"  # a CPU build (see below): the main venv's 2.14.1 is a CUDA build
  "safetensors"
  "numpy<2.5"
  "scikit-learn"
)
check() {
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import trl, diffusers, transformers, torch  # noqa: F401
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401
assert m.version("trl") == "0.23.1", m.version("trl")
print("ddpo venv ok:", {p: m.version(p) for p in ["trl", "diffusers", "transformers", "accelerate", "peft", "torch"]})
PY
}
if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch first, the CPU wheel (pip would otherwise fetch a CUDA build and its nvidia-* libraries, gigabytes): from
# this machine's /opt/wheels when there, else PyTorch's CPU index
"$VENV/bin/pip" install --quiet "torch==2.13.0+cpu" --find-links /opt/wheels \
  --extra-index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/pip" install --quiet "${PINS[@]}"
check
