#!/usr/bin/env bash
# make test: the whole suite on the default runtime (.comfyui, ComfyUI 0.33.0 unless COMFYUI_DIR),
# then the comfy and e2e tiers on the oldest supported runtime (.comfyui-0.3.75), less the tests of
# the pack's own machinery (marker one_runtime: worker and Ray faults, interrupts, the in-process
# Ray tier, the soak), whose ComfyUI-facing parts other tests check there. Both always run;
# the exit status is a failure when either failed.
set -u
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }
rc=0
echo "=== make test [1/2]: every tier on ComfyUI $(version_of .comfyui) (.comfyui) ==="
$VPY -m pytest "$@" || rc=$?
if [ -f .comfyui-0.3.75/main.py ] && [ "$(cd .comfyui && pwd -P)" != "$(cd .comfyui-0.3.75 && pwd -P)" ] \
   && [ ! -f .comfyui/.pvae-fallback ]; then
  echo "=== make test [2/2]: comfy and e2e tiers on ComfyUI $(version_of .comfyui-0.3.75) (.comfyui-0.3.75) ==="
  $VPY -m pytest tests/comfy tests/e2e --comfyui=.comfyui-0.3.75 -m "not one_runtime" "$@" || rc=$?
else
  echo "=== make test [2/2]: skipped, the default runtime is already ComfyUI 0.3.75 ==="
fi
exit $rc
