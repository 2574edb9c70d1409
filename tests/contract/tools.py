"""External tools the contract suite drives (npm, node). CI sets REQUIRE_NODE=1 so a missing
tool fails the run instead of skipping the tests silently."""

from __future__ import annotations

import os
import shutil

import pytest

_missing = shutil.which("npm") is None or shutil.which("node") is None

if _missing and os.environ.get("REQUIRE_NODE") == "1":
    raise RuntimeError("npm and node are required (REQUIRE_NODE=1) but not installed")

needs_npm = pytest.mark.skipif(_missing, reason="npm/node are not installed")
