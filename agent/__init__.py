"""The Corolla tray agent: shares this computer's idle GPU by supervising a ``corolla server``.

The app core (:class:`AgentApp`, policy, supervisor, settings) has no GUI imports; the tray
(:mod:`corolla.agent.tray`, pystray) and the CLI (:mod:`corolla.agent.cli`) are thin shells
over :meth:`AgentApp.dispatch`.
"""

from corolla.agent.app import AgentApp
from corolla.agent.paths import AgentPaths
from corolla.agent.policy import Policy, PolicyConfig, Readings
from corolla.agent.sensors import Sensors
from corolla.agent.settings import AgentSettings, SettingsStore
from corolla.agent.state import AgentState, Command, Reply, Status
from corolla.agent.supervisor import Backoff, Supervisor

__all__ = [
    "AgentApp",
    "AgentPaths",
    "AgentSettings",
    "AgentState",
    "Backoff",
    "Command",
    "Policy",
    "PolicyConfig",
    "Readings",
    "Reply",
    "Sensors",
    "SettingsStore",
    "Status",
    "Supervisor",
]
