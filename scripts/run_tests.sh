#!/usr/bin/env bash
# make test: set up from nothing (scripts/setup.sh), run the whole suite on the default runtime
# (.comfyui, ComfyUI 0.33.0 unless COMFYUI_DIR), then on the oldest supported runtime
# (.comfyui-0.3.75) the tests of what can differ between runtimes (marker every_runtime: the compat
# tier, exact mode over ComfyUI's own Wan modules, one end-to-end pass per node through a real
# server). Both passes always run; the exit status is a failure when either failed. Each pass ends
# with its time per tier (tests/conftest.py); the last line gives the time of each step.
set -u
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f min", s / 60 }'; }
start=$SECONDS
bash scripts/setup.sh || exit $?
setup_s=$((SECONDS - start))
rc=0
echo "=== make test [1/2]: every tier on ComfyUI $(version_of .comfyui) (.comfyui) ==="
t=$SECONDS
$VPY -m pytest "$@" || rc=$?
first="ComfyUI $(version_of .comfyui), every test: $(minutes $((SECONDS - t)))"
second="ComfyUI 0.3.75: skipped (the default runtime is 0.3.75)"
if [ -f .comfyui-0.3.75/main.py ] && [ "$(cd .comfyui && pwd -P)" != "$(cd .comfyui-0.3.75 && pwd -P)" ] \
   && [ ! -f .comfyui/.pvae-fallback ]; then
  echo "=== make test [2/2]: what can differ between runtimes (every_runtime) on ComfyUI $(version_of .comfyui-0.3.75) (.comfyui-0.3.75) ==="
  t=$SECONDS
  $VPY -m pytest tests/comfy tests/e2e --comfyui=.comfyui-0.3.75 -m every_runtime "$@" || rc=$?
  second="ComfyUI $(version_of .comfyui-0.3.75), every_runtime tests: $(minutes $((SECONDS - t)))"
else
  echo "=== make test [2/2]: skipped, the default runtime is already ComfyUI 0.3.75 ==="
fi
echo "=== make test took $(minutes $((SECONDS - start))): setup $(minutes $setup_s); $first; $second ==="
exit $rc
