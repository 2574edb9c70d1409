"""Spec lint with Redocly CLI (npm) and the ruleset in redocly.yaml: no errors, no warnings."""

from __future__ import annotations

import subprocess

from scripts.local_server import ROOT
from tests.contract.tools import needs_npm

TS = ROOT / "tests/contract/ts"


@needs_npm
def test_redocly_lint_is_clean():
    subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=TS, check=True)
    result = subprocess.run(
        [
            str(TS / "node_modules/.bin/redocly"),
            "lint",
            "openapi.yaml",
            "--config",
            "redocly.yaml",
            "--format",
            "stylish",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower().replace("deprecation warning", ""), output
