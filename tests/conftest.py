"""Shared fixtures. Tiers: unit/ (engine only, no ComfyUI), comfy/ (the real comfy package
in-process), e2e/ (a real headless ComfyUI server), browser/ (ComfyUI's frontend in Chromium).

``--comfyui PATH`` picks the ComfyUI runtime for the comfy, e2e and browser tiers (default: the
one setup.sh made in .comfyui, or $COMFYUI_DIR). One pytest run uses one runtime, since ComfyUI
can be imported only once per process; `make test` runs the suite once per runtime. The runtime
is printed in the header, under every failure, and at the end.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

ARTIFACTS = REPO / "test-artifacts"


def pytest_addoption(parser):
    parser.addoption("--comfyui", default=None, metavar="PATH",
                     help="ComfyUI tree to test against (default: $COMFYUI_DIR or .comfyui)")


def pytest_configure(config):
    from testkit import comfy_env

    # the suite checks workers on latents small enough that the gate (parallel_vae/gate.py) would
    # decode them in ComfyUI's process once speeds are measured: prompts without a sharding input
    # shard over every device named here (in-process and on the test servers); the gate's own
    # tests pass sharding="auto"
    os.environ.setdefault("PARALLEL_VAE_SHARDING", "every device")

    root = config.getoption("--comfyui")
    if root:
        os.environ[comfy_env.RUNTIME_ENV] = str(Path(root).resolve())


def _runtime() -> str:
    from testkit import comfy_env

    try:
        return comfy_env.runtime_label()
    except RuntimeError as e:
        return str(e)


def pytest_report_header(config):
    return f"runtime: {_runtime()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "/unit/" not in str(item.fspath):
        report.sections.append(("runtime", f"this test ran on {_runtime()}"))


_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Adds up each test's setup, call and teardown by tier (unit, comfy, e2e, browser)."""
    parts = report.nodeid.split("/")
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _TIER_SECONDS:
        terminalreporter.write_line("time per tier: " + ", ".join(
            f"{tier} {seconds / 60:.1f} min" for tier, seconds in sorted(_TIER_SECONDS.items())))
    terminalreporter.write_line(f"runtime of the comfy, e2e and browser tests above: {_runtime()}")


@pytest.fixture(scope="session")
def runtime_version() -> tuple[int, ...]:
    """The ComfyUI version under test as numbers, e.g. (0, 33, 0)."""
    from testkit import comfy_env

    return tuple(int(p) for p in comfy_env.comfy_version().split(".")[:3] if p.isdigit())


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
