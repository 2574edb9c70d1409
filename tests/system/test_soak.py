"""The soak run in a short form: gunicorn with several workers (PostgreSQL when reachable),
mixed reads, debits and webhooks, then every invariant. Zero 5xx and all invariants hold."""

from __future__ import annotations

from scripts import soak


def test_short_soak_keeps_every_invariant(capsys):
    status = soak.main(["--seconds", "6", "--max-requests", "2000", "--workers", "3"])
    out = capsys.readouterr().out
    assert "requests served:" in out
    assert "FAILED" not in out, out
    assert "5xx answers: 0" in out, out
    assert "[ok] work was done" in out, out
    assert status == 0, out
