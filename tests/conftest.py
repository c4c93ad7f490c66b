"""Shared fixtures. Tiers: unit/ (engine only, no ComfyUI), comfy/ (the real comfy package
in-process), e2e/ (a real headless ComfyUI server)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Random-weight VAE files are built once and reused across runs (git-ignored).
CACHE = Path(os.environ.get("PVAE_CACHE", REPO / ".cache")).resolve()
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def vae_dir() -> Path:
    d = CACHE / "test-vaes"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
