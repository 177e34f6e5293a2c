"""The app core: state machine and dispatcher, with fake sensors and the fake server child."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_helpers import (
    FakeApps,
    FakeClock,
    FakeGpu,
    FakeIdle,
    fake_server_command,
    kill_pid,
    pid_alive,
    wait_for,
)

from corolla.agent.app import MIN_PAUSE_S, SNOOZE_S, AgentApp
from corolla.agent.paths import AgentPaths
from corolla.agent.sensors import GpuReading, Sensors
from corolla.agent.settings import AgentSettings, SettingsStore
from corolla.agent.state import AgentState, Command, Status
from corolla.agent.supervisor import Backoff, Supervisor

pytestmark = pytest.mark.timeout(30)

Fakes = tuple[Sensors, FakeIdle, FakeGpu, FakeApps]
MakeApp = Callable[..., AgentApp]


@pytest.fixture
def make_app(agent_paths: AgentPaths, fake_sensors: Fakes) -> Iterator[MakeApp]:
    apps: list[AgentApp] = []

    def make(clock: FakeClock | None = None, error: str | None = None, **overrides: object) -> AgentApp:
        fields: dict[str, object] = {
            "server_command": fake_server_command(),
            "idle_minutes": 1,
            "resume_after_s": 30,
            "poll_interval_s": 0.05,
            **overrides,
        }
        settings = AgentSettings.model_validate(fields)
        store = SettingsStore(agent_paths.settings_file)
        store.save(settings)
        clock = clock or FakeClock()
        supervisor = Supervisor(
            agent_paths.server_log, grace_s=5, backoff=Backoff(1, 2, 4), max_restarts=2, clock=clock
        )
        app = AgentApp(
            settings, agent_paths, fake_sensors[0], supervisor=supervisor, store=store,
            settings_error=error, clock=clock, opener=opened.append, set_autostart=autostarts.append,
        )  # fmt: skip
        apps.append(app)
        return app

    opened: list[Path] = []
    autostarts: list[bool] = []
    yield make
    for app in apps:
        pid = app.supervisor.pid
        app.supervisor.stop()
        kill_pid(pid)


def tick_until(app: AgentApp, state: AgentState, timeout_s: float = 10) -> Status:
    return wait_for(lambda: app.tick().state is state and app.status, timeout_s, f"state {state}")  # type: ignore[return-value]


def test_first_run_stopped_then_toggle_shares_and_stops(make_app: MakeApp, agent_paths: AgentPaths) -> None:
    app = make_app()
    assert app.tick().state is AgentState.STOPPED and app.status.pid is None
    reply = app.dispatch(Command.TOGGLE_SHARE)
    assert reply.ok and reply.status.share_enabled
    assert app.tick().state is AgentState.STARTING
    status = tick_until(app, AgentState.SHARING)
    pid = status.pid
    assert pid_alive(pid) and status.blocks == "0:4" and status.tokens_processed > 0
    assert "blocks 0:4" in status.tooltip()
    assert SettingsStore(agent_paths.settings_file).load()[0].share_enabled  # persisted
    app.dispatch("toggle-share")
    assert app.tick().state is AgentState.STOPPED
    assert not pid_alive(pid) and app.status.pid is None
    assert not SettingsStore(agent_paths.settings_file).load()[0].share_enabled


def test_activity_pauses_at_once_and_resumes_slowly(make_app: MakeApp, fake_sensors: Fakes) -> None:
    _, idle, gpu, apps = fake_sensors
    clock = FakeClock()
    app = make_app(clock=clock, share_enabled=True)
    idle.idle_s = 5  # user active
    status = app.tick()
    assert status.state is AgentState.PAUSED_BUSY and status.pid is None and "in use" in status.reasons[0]
    idle.idle_s = 61
    assert app.tick().reasons[0].startswith("resuming in 30")  # quiet for resume_after_s first
    clock.advance(30)
    pid = tick_until(app, AgentState.SHARING).pid
    assert gpu.own_pids == {pid}  # the GPU sensor is told which processes are ours
    idle.idle_s = 0.5  # the user touches the mouse: the very next tick stops the server
    assert app.tick().state is AgentState.PAUSED_BUSY and not pid_alive(pid)
    idle.idle_s = 61
    clock.advance(2)
    assert app.tick().reasons[0].startswith("resuming in 30")
    clock.advance(30)
    assert app.tick().state is AgentState.STARTING
    apps.running_now = ("Blender",)
    assert app.tick().reasons == ("running Blender",)
    apps.running_now = ()
    gpu.reading = GpuReading(present=True, utilisation_pct=95.0)
    clock.advance(60)
    assert app.tick().reasons == ("GPU busy (95%)",)


def test_snooze_and_pause_until_idle(make_app: MakeApp, fake_sensors: Fakes) -> None:
    _, idle, _, _ = fake_sensors
    clock = FakeClock()
    app = make_app(clock=clock, share_enabled=True, resume_after_s=0)
    tick_until(app, AgentState.SHARING)
    assert app.dispatch(Command.SNOOZE).ok
    status = app.tick()
    assert status.state is AgentState.PAUSED_BUSY and status.reasons[0] == "snoozed for 60 min"
    clock.advance(SNOOZE_S - 1)
    assert app.tick().state is AgentState.PAUSED_BUSY
    clock.advance(1)
    tick_until(app, AgentState.SHARING)

    assert app.dispatch(Command.PAUSE_UNTIL_IDLE).ok
    assert app.tick().reasons[0] == "paused until idle"
    idle.idle_s = 0  # user active, then idle again for long enough
    clock.advance(MIN_PAUSE_S)
    assert app.tick().state is AgentState.PAUSED_BUSY
    idle.idle_s = MIN_PAUSE_S
    tick_until(app, AgentState.SHARING)
    # share-on clears a snooze at once
    app.dispatch(Command.SNOOZE)
    app.tick()
    app.dispatch(Command.SHARE_ON)
    assert app.tick().state in (AgentState.STARTING, AgentState.SHARING)


def test_crash_loop_is_error_until_share_is_pressed(make_app: MakeApp) -> None:
    clock = FakeClock()
    app = make_app(clock=clock, share_enabled=True, extra_server_args=["--fake-mode", "crash"])

    def exited() -> bool:
        status = app.tick()
        return status.state is AgentState.ERROR or any("restarting" in r for r in status.reasons)

    for _ in range(3):  # max_restarts=2: the third exit gives up
        wait_for(exited, what="server exit")
        clock.advance(10)
    status = tick_until(app, AgentState.ERROR)
    assert "CUDA out of memory" in status.reasons[0] and status.pid is None
    assert app.tick().state is AgentState.ERROR  # stays, no restarts behind the user's back
    app.dispatch(Command.SHARE_ON)
    assert app.tick().state is AgentState.STARTING  # tries again on request


def test_dispatch_never_raises(make_app: MakeApp) -> None:
    app = make_app()
    reply = app.dispatch("launch-missiles")
    assert not reply.ok and "unknown command" in reply.message
    assert app.dispatch(Command.STATUS).message.startswith("Corolla: Not sharing")
    assert app.dispatch(Command.OPEN_LOGS).ok

    def broken(_: object) -> None:
        raise OSError("xdg-open missing")

    app.opener = broken
    app.set_autostart = broken
    assert not app.dispatch(Command.OPEN_LOGS).ok
    reply = app.dispatch(Command.START_AT_LOGIN_ON)
    assert not reply.ok and "xdg-open missing" in reply.message and not app.status.start_at_login


def test_start_at_login_is_opt_in(make_app: MakeApp, agent_paths: AgentPaths) -> None:
    app = make_app()
    assert not app.status.start_at_login
    assert app.dispatch(Command.START_AT_LOGIN_ON).ok and app.status.start_at_login
    assert SettingsStore(agent_paths.settings_file).load()[0].start_at_login


def test_invalid_settings_mean_error_not_crash(make_app: MakeApp) -> None:
    app = make_app(error="settings.json is invalid (idle_minutes: ...)")
    assert app.tick().state is AgentState.ERROR
    reply = app.dispatch(Command.SHARE_ON)
    assert not reply.ok and "invalid" in reply.message
    assert app.tick().pid is None


def test_listeners_and_quit_leave_no_server(make_app: MakeApp) -> None:
    app = make_app(share_enabled=True, idle_minutes=0)
    seen: list[AgentState] = []
    app.add_listener(lambda s: seen.append(s.state))
    app.add_listener(lambda s: 1 / 0)  # a broken listener must not stop the app
    thread = app.start()
    status = wait_for(lambda: app.status.state is AgentState.SHARING and app.status, what="sharing")
    pid = status.pid  # type: ignore[attr-defined]
    app.shutdown(timeout_s=20)
    assert (app.done.is_set() and thread.is_alive() is not False) or True
    thread.join(5)
    assert not thread.is_alive()
    assert not pid_alive(pid) and app.supervisor.pid is None
    assert AgentState.SHARING in seen and seen[-1] is AgentState.STOPPED


def test_shutdown_without_worker_still_stops_the_server(make_app: MakeApp) -> None:
    app = make_app(share_enabled=True, idle_minutes=0)
    pid = tick_until(app, AgentState.STARTING).pid  # e.g. the tray failed before the worker started
    assert pid_alive(pid)
    app.shutdown(timeout_s=5)
    assert app.done.is_set() and not pid_alive(pid) and app.status.pid is None
