"""`python -m seat.demo` runs end to end: CE falls, only masked entries move."""
from __future__ import annotations

from seat.demo.ops_tour import main


def test_demo_runs_and_trains(capsys):
    assert main(["--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "outside the mask bit-exact: True" in out
    assert "restores the base model bit-exactly: True" in out
