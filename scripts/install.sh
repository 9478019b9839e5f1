#!/usr/bin/env bash
# Install scaletrain (editable) into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # + test dependencies (pytest, transformers)
#   bash scripts/install.sh --bench  # + benchmark dependencies (DeepSpeed, for the ZeRO comparison)
# Without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0: an unpinned
# `torch` requirement would pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --bench) extras+=(bench) ;;
    *) echo "error: unknown option $arg (allowed: --test, --bench)" >&2; exit 2 ;;
  esac
done
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req="torch>=2.6"
else
  torch_req="torch==2.13.0"
fi
"$python" -m pip install --quiet --disable-pip-version-check "$torch_req" -e "$spec"
echo "installed scaletrain ($torch_req) into $("$python" -c 'import sys; print(sys.prefix)')"
