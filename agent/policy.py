"""When to share: pure rules over sensor readings, with fast pause and slow resume.

Sharing happens only while every condition holds: the user has been idle for
``idle_minutes`` (unknown idle time counts as active), no app from the pause list runs, and
the GPU is not busy with someone else's work. Any violation pauses at once; after a pause,
everything must stay quiet for ``resume_after_s`` before sharing resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from corolla.agent.sensors import GpuReading

GIB = 1024**3


@dataclass(frozen=True)
class Readings:
    """One sample of every sensor.

    Attributes:
        idle_s: Seconds since the last user input (None: unknown).
        gpu: The GPU reading.
        pausing_apps: Running apps from the pause list.
    """

    idle_s: float | None
    gpu: GpuReading
    pausing_apps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What the policy says: share or not, and why not (user-facing phrases)."""

    share: bool
    reasons: tuple[str, ...] = ()


@dataclass
class PolicyConfig:
    """The policy's thresholds (copied from the settings)."""

    idle_minutes: float = 5.0
    gpu_busy_percent: float = 30.0
    resume_after_s: float = 30.0
    min_free_gb: float | None = None


def busy_reasons(readings: Readings, config: PolicyConfig, sharing: bool) -> tuple[str, ...]:
    """Why the machine is busy right now (empty: free to share).

    Args:
        readings: The sensor sample.
        config: Thresholds.
        sharing: Whether our server is running (its own GPU load and memory are then ignored).

    Returns:
        Short phrases such as ``"in use (idle 12 s of 300 s)"``.
    """
    reasons: list[str] = []
    need_idle_s = config.idle_minutes * 60.0
    if need_idle_s > 0:
        if readings.idle_s is None:
            reasons.append("idle time unknown")
        elif readings.idle_s < need_idle_s:
            reasons.append(f"in use (idle {readings.idle_s:.0f} s of {need_idle_s:.0f} s)")
    if readings.pausing_apps:
        reasons.append("running " + ", ".join(readings.pausing_apps))
    gpu = readings.gpu
    if gpu.present:
        if gpu.foreign_pids:
            reasons.append(f"GPU used by {len(gpu.foreign_pids)} other process(es)")
        if not sharing:
            if gpu.utilisation_pct is not None and gpu.utilisation_pct >= config.gpu_busy_percent:
                reasons.append(f"GPU busy ({gpu.utilisation_pct:.0f}%)")
            if (
                config.min_free_gb is not None
                and gpu.free_bytes is not None
                and gpu.free_bytes < config.min_free_gb * GIB
            ):
                reasons.append(f"only {gpu.free_bytes / GIB:.1f} GiB GPU memory free")
    return tuple(reasons)


class Policy:
    """Stateful wrapper around :func:`busy_reasons` that adds the slow resume.

    Args:
        config: Thresholds.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._quiet_since = -math.inf

    def reset(self) -> None:
        """Forgets past activity (the user just asked to share: no resume delay)."""
        self._quiet_since = -math.inf

    def decide(self, readings: Readings, now: float, sharing: bool) -> Decision:
        """Decides whether to share now.

        Args:
            readings: The sensor sample.
            now: Monotonic seconds.
            sharing: Whether the server is running.

        Returns:
            The decision.
        """
        reasons = busy_reasons(readings, self.config, sharing)
        if reasons:
            self._quiet_since = math.nan  # busy: the quiet period restarts when this ends
            return Decision(False, reasons)
        if math.isnan(self._quiet_since):
            self._quiet_since = now
        waited = now - self._quiet_since
        if sharing or waited >= self.config.resume_after_s:
            return Decision(True)
        return Decision(False, (f"resuming in {self.config.resume_after_s - waited:.0f} s",))
