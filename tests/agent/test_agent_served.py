"""The tray tooltip and `corolla-agent status` show the tokens this machine served (the server's ledger)."""

from __future__ import annotations

import json
from pathlib import Path

from corolla.agent.serverstatus import read_stats
from corolla.agent.settings import AgentSettings
from corolla.agent.state import AgentState, Status


def test_tooltip_says_what_you_served() -> None:
    status = Status(state=AgentState.SHARING, tokens_served_today=1234, tokens_served_total=56789)
    assert "you served 1,234 tokens today / 56,789 in total" in status.tooltip()
    assert "you served" not in Status(state=AgentState.SHARING).tooltip()  # nothing served yet: no line


def test_status_file_carries_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"state": "online", "tokens_served_today": 7, "tokens_served_total": 9}))
    stats = read_stats(path)
    assert stats is not None and (stats.tokens_served_today, stats.tokens_served_total) == (7, 9)


def test_settings_pass_the_swarm_key_to_the_server(tmp_path: Path) -> None:
    argv = AgentSettings(swarm_key_file="/home/me/team.key").server_argv(tmp_path / "s.json", "cpu")
    assert argv[argv.index("--swarm-key") + 1] == "/home/me/team.key"
    assert "--swarm-key" not in AgentSettings().server_argv(tmp_path / "s.json", "cpu")
