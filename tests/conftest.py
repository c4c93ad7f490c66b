"""Shared fixtures. Tiers: unit/ (engine only, no ComfyUI), comfy/ (the real comfy package
in-process), e2e/ (a real headless ComfyUI server)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def vae_dir() -> Path:
    from testkit.random_vaes import cache_dir

    d = cache_dir()  # random-weight VAE files, built once and reused across runs (git-ignored)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
