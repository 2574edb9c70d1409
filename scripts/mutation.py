"""Mutation testing of the money modules with mutmut: how many deliberate breakages the
in-process tests catch, per module. A report, like a benchmark: slow, not a CI step.

    python -m scripts.mutation [--modules billing/ledger.py ...] [--workers 2]

Installs mutmut (3.x) into the project's .venv if missing, mutates each module in turn (in
mutmut's own copy of the tree under mutants/), runs the in-process tests against each mutant
on SQLite, and prints killed / survived / other per module. Surviving mutants are listed so
each can be killed by a test or explained as equivalent.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MONEY_MODULES = [
    "billing/ledger.py",
    "billing/webhooks.py",
    "billing/idempotency.py",
    "billing/auto_recharge.py",
    "billing/metering.py",
    # Their successors: code split out of the five above.
    "billing/recharge_policy.py",  # auto-recharge's decision, from auto_recharge.py
    "billing/metering_sql.py",  # the batch's statements, from metering.py
    "billing/disputes.py",  # dispute state, from webhooks.py
    "billing/stripe_events.py",  # the typed events, from webhooks.py
]
# In-process tests only: no gunicorn, no browser, no npm. mutmut 3 runs, for each mutant, only
# the tests whose run reached the mutated function.
TEST_SELECTION = ["tests", "--ignore=tests/contract", "--ignore=tests/system"]
RESULT_LINE = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>[\w ]+)$")


def _ensure_mutmut() -> Path:
    exe = BIN / "mutmut"
    if not exe.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "mutmut>=3.8,<4"], check=True
        )
    return exe


def _write_config(module: str, tests: list[str]) -> str:
    """mutmut 3 reads [mutmut] from setup.cfg; write one for this module, return the old."""
    cfg = ROOT / "setup.cfg"
    previous = cfg.read_text() if cfg.exists() else ""

    def listed(values: list[str]) -> str:
        return "".join(f"\n    {value}" for value in values)

    cfg.write_text(
        "[mutmut]\n"
        f"source_paths={module}\n"
        f"pytest_add_cli_args_test_selection={listed(tests)}\n"
        f"also_copy={listed(['billing/', 'handlers/', 'models/', 'scripts/', 'openapi.yaml'])}\n"
        f"pytest_add_cli_args={listed(['-q'])}\n"
    )
    return previous


def run_module(module: str, workers: int, tests: list[str]) -> collections.Counter[str]:
    mutmut = _ensure_mutmut()
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    previous = _write_config(module, tests)
    try:
        subprocess.run(
            [str(mutmut), "run", "--max-children", str(workers)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            check=False,
        )
        out = subprocess.run(
            [str(mutmut), "results", "--all", "true"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    finally:
        cfg = ROOT / "setup.cfg"
        if previous:
            cfg.write_text(previous)
        else:
            cfg.unlink(missing_ok=True)
    counts: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            status = match["status"].strip()
            counts[status] += 1
            if status == "survived":
                print(f"    survived: {match['name']}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts.mutation")
    parser.add_argument("--modules", nargs="+", default=MONEY_MODULES)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--tests",
        nargs="+",
        default=TEST_SELECTION,
        help="pytest selection (default: every in-process test)",
    )
    args = parser.parse_args(argv)
    rows = []
    for module in args.modules:
        print(f"== {module}")
        counts = run_module(module, args.workers, args.tests)
        killed, survived = counts["killed"], counts["survived"]
        other = sum(counts.values()) - killed - survived
        score = killed / (killed + survived) if killed + survived else 0.0
        rows.append((module, killed, survived, other, score))
    print(f"\n{'module':<28} {'killed':>7} {'survived':>9} {'other':>6} {'score':>6}")
    for module, killed, survived, other, score in rows:
        print(f"{module:<28} {killed:>7} {survived:>9} {other:>6} {score:>6.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
