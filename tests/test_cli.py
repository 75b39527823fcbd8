"""The command line: ``moce-fast selfcheck`` on a real photo."""

from __future__ import annotations

import pytest

from moce_fast.cli import main


def test_selfcheck_runs_on_a_real_photo(capsys):
    assert main(["selfcheck", "--config", "MoCE_IR_S", "--size", "40", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "input  (1, 3, 37, 35)" in out and "output (1, 3, 37, 35)" in out
    assert "ran: torch" in out and "selfcheck: OK" in out


def test_selfcheck_rejects_tiny_sizes():
    with pytest.raises(SystemExit):
        main(["selfcheck", "--size", "4"])
