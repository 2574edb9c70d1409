"""The rendered spec (Swagger UI at /ui/) opened in headless Chromium: every operation shows.

Saves artifacts/swagger-ui.png. Chromium comes from Debian's package (.ci/run installs it);
with REQUIRE_BROWSER=1 (set by CI) a missing browser fails instead of skipping.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

from scripts.local_server import ROOT, LocalServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, *extra: str) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-")
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--window-size=1280,4000",
        *extra,
        url,
    ]
    result = subprocess.run(flags, capture_output=True, text=True, timeout=180)
    return result.stdout


@pytest.fixture(scope="module")
def rendered():
    if CHROMIUM is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (REQUIRE_BROWSER=1) but not installed")
        pytest.skip("chromium is not installed")
    with LocalServer() as server:
        dom = chromium(f"{server.base_url}/ui/", "--dump-dom")
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "swagger-ui.png").unlink(missing_ok=True)  # never pass on an old one
        chromium(f"{server.base_url}/ui/", f"--screenshot={artifacts / 'swagger-ui.png'}")
    return html.unescape(dom)


def test_every_operation_is_rendered(rendered):
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    shown = set(
        re.findall(r'opblock-summary-method">(\w+)<.*?data-path="([^"]+)"', rendered, flags=re.S)
    )
    expected = {
        (m.upper(), p)
        for p, item in spec["paths"].items()
        for m in item
        if m in ("get", "post", "patch", "put", "delete")
    }
    assert expected <= shown, expected - shown
    assert spec["info"]["title"] in rendered


def test_screenshot_saved(rendered):
    """This run's screenshot (the fixture deletes any earlier one), at the window's size."""
    shot = (ROOT / "artifacts/swagger-ui.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(shot[16:20], "big"), int.from_bytes(shot[20:24], "big")
    assert (width, height) == (1280, 4000)
