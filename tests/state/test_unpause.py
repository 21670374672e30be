"""``csrproxy-admin unpause``: a paused name's failures in a row are forgotten."""

from __future__ import annotations

from pathlib import Path

import pytest

from csrproxy.admin import main, unpause
from csrproxy.issuance.admission import Admission, Budgets
from csrproxy.state.budgets import load_budgets, save_budgets
from csrproxy.state.store import StateDir

NAME = "p.go.example.test"


def paused(state: StateDir) -> None:
    """An earlier run paused NAME (and spent its hourly failures)."""
    db = state.open_db()
    try:
        budgets = Budgets(0, 0, 0, 0, 5, 2)
        a = Admission(lambda: 1000.0, budgets, persist=lambda rows: save_budgets(db, rows))
        a.authorization_failed(NAME)
        a.authorization_failed(NAME)
    finally:
        db.close()


def test_unpause_forgets_the_count_and_keeps_the_hourly_failures(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    paused(state)
    db = state.open_db()
    try:
        message = unpause(db, f"*.{NAME.upper()}.")
        assert message.startswith(f"{NAME}: its failed authorizations in a row are forgotten")
        assert "restart csrproxy" in message
        assert [r[0] for r in load_budgets(db, 0, 10)] == [f"failed-authz:{NAME}"]
        assert "nothing to unpause" in unpause(db, NAME)
        again = Admission(lambda: 1000.0, Budgets(0, 0, 0, 0, 0, 2))
        for prefix, since, limit in again.restore_queries():
            again.restore(load_budgets(db, since, limit, prefix=prefix))
        again.admit_order([NAME], True)  # no longer paused after the restart
    finally:
        db.close()


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    paused(state)
    config = tmp_path / "csrproxy.toml"
    config.write_text(
        '[acme]\ndirectory = "https://ca.test/dir"\n[dns]\nzone = "go.example.test"\n'
        '[policy]\nnames = ["{label}.go.example.test"]\n'
        f'[state]\ndir = "{state.path}"\n'
    )
    assert main(["--config", str(config), "unpause", NAME]) == 0
    assert "forgotten" in capsys.readouterr().out
    assert main(["--config", str(config), "unpause"]) == 2  # NAME is required
