"""The sharing policy: idle threshold, busy GPU, pausing apps, fast pause and slow resume."""

from __future__ import annotations

import pytest

from corolla.agent.policy import GIB, Policy, PolicyConfig, Readings, busy_reasons
from corolla.agent.sensors import NO_GPU, GpuReading, UnknownIdleSensor, make_idle_sensor, parse_hid_idle

pytestmark = pytest.mark.timeout(10)

GPU_FREE = GpuReading(present=True, name="RTX", utilisation_pct=0.0, free_bytes=20 * GIB)


def test_idle_threshold_and_unknown_idle() -> None:
    config = PolicyConfig(idle_minutes=5)
    assert busy_reasons(Readings(idle_s=301, gpu=NO_GPU), config, sharing=False) == ()
    assert "in use" in busy_reasons(Readings(idle_s=12, gpu=NO_GPU), config, sharing=False)[0]
    assert busy_reasons(Readings(idle_s=None, gpu=NO_GPU), config, sharing=False) == ("idle time unknown",)
    # idle_minutes=0: share whenever sharing is on, even with unknown idle time
    assert busy_reasons(Readings(idle_s=None, gpu=NO_GPU), PolicyConfig(idle_minutes=0), False) == ()


def test_gpu_rules_ignore_our_own_load() -> None:
    config = PolicyConfig(idle_minutes=0, gpu_busy_percent=30, min_free_gb=8)
    busy = GpuReading(present=True, utilisation_pct=90.0, free_bytes=2 * GIB)
    reasons = busy_reasons(Readings(0, busy), config, sharing=False)
    assert any("GPU busy (90%)" in r for r in reasons) and any("GiB GPU memory free" in r for r in reasons)
    # while our server runs, its utilisation and memory are ours: not a reason to stop
    assert busy_reasons(Readings(0, busy), config, sharing=True) == ()
    game = GpuReading(present=True, utilisation_pct=10.0, foreign_pids=(4242,), free_bytes=20 * GIB)
    assert busy_reasons(Readings(0, game), config, sharing=True) == ("GPU used by 1 other process(es)",)
    assert busy_reasons(Readings(0, GPU_FREE), config, sharing=False) == ()


def test_pausing_apps() -> None:
    reasons = busy_reasons(Readings(0, NO_GPU, ("blender",)), PolicyConfig(idle_minutes=0), False)
    assert reasons == ("running blender",)


def test_pause_fast_resume_slow() -> None:
    policy = Policy(PolicyConfig(idle_minutes=1, resume_after_s=30))
    idle, active = Readings(100, GPU_FREE), Readings(2, GPU_FREE)
    assert policy.decide(idle, now=0, sharing=False).share  # first decision: no resume delay
    assert not policy.decide(active, now=1, sharing=True).share  # activity: pause at once
    # idle again (e.g. idle 100 s reported): must stay quiet resume_after_s first
    waiting = policy.decide(idle, now=200, sharing=False)
    assert not waiting.share and waiting.reasons[0].startswith("resuming in 30")
    assert not policy.decide(idle, now=229, sharing=False).share
    assert policy.decide(idle, now=230, sharing=False).share
    policy.decide(active, now=231, sharing=True)
    policy.reset()  # the user pressed "share": no delay
    assert policy.decide(idle, now=232, sharing=False).share


def test_idle_sensor_choice() -> None:
    assert isinstance(make_idle_sensor("linux", {"WAYLAND_DISPLAY": "wayland-0"}), UnknownIdleSensor)
    assert isinstance(make_idle_sensor("linux", {}), UnknownIdleSensor)
    assert type(make_idle_sensor("linux", {"DISPLAY": ":0"})).__name__ == "X11IdleSensor"
    assert type(make_idle_sensor("darwin", {})).__name__ == "MacIdleSensor"
    assert type(make_idle_sensor("win32", {})).__name__ == "WindowsIdleSensor"
    assert UnknownIdleSensor().idle_seconds() is None


def test_mac_hid_idle_parse() -> None:
    out = '    | |   "HIDIdleTime" = 2500000000\n'
    assert parse_hid_idle(out) == 2.5
    assert parse_hid_idle("nothing") is None


def test_nvml_without_driver_is_a_state() -> None:
    from corolla.agent.sensors import NvmlGpuSensor

    reading = NvmlGpuSensor().read(frozenset())
    # On this CPU-only machine NVML is absent; on a GPU machine the reading is real.
    assert reading.present or reading.name.startswith("no NVIDIA GPU")
