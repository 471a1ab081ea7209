"""Fault knobs and counters of the local server (test instrumentation, no I/O).

Role: tests and benchmarks make the local server misbehave on purpose and count what
reached it. The realtime and enrollment handlers read a :class:`FaultPlan` snapshot; they
never mutate :class:`Faults` themselves except through :meth:`Faults.take_session` /
:meth:`Faults.take_enrollment`, which consume one use.

Boundary: pure bookkeeping; the handlers in ``realtime.py`` / ``app.py`` act on the plan.

Knobs (``srv.faults.<name> = value``; all default off). Session knobs apply to the next
``times`` realtime sessions (handshakes) and then reset themselves; ``times=None`` keeps them
on until :meth:`Faults.reset`. Set ``times`` *after* (or together with, via
:meth:`Faults.set`) the knobs it should limit.

=========================  ==================================================================
``first_audio_delay_s``    sleep before the first ``response.audio.delta`` of every response
``delta_interval_s``       minimum spacing of deltas (absolute schedule, added to pacing)
``drop_after_deltas``      after N deltas of the session: close the TCP connection without a
                           WebSocket close frame (the client sees 1006); N = 0 acts when the
                           first audio is due, before any delta (likewise for the two below)
``close_after_deltas``     after N deltas: close with ``close_code`` (default 1011) and
                           ``close_reason``
``error_event_at``         send an ``error`` event (``error_code``, ``error_message``) at a
                           step: ``"session.created"`` (right after it), ``"session.update"``,
                           ``"append"``, ``"commit"``, ``"clear"``, ``"finish"`` (the client
                           event is then *not* processed) or ``"delta:N"`` (before the Nth
                           delta of the session). With ``error_close_code`` set the socket
                           is closed with that code right after the error; otherwise the
                           session goes on.
``stall_after_deltas``     after N deltas: send nothing more, keep the socket open and keep
                           reading (until the client closes or the server stops)
``refuse_handshake``       answer the WebSocket upgrade with this HTTP status (401, 403, 429,
                           503, ...) and a DashScope JSON error body
``omit_committed``         never send ``input_text_buffer.committed`` (clients must not
                           require it, protocol.md §5.6)
``duplicate_committed``    send ``input_text_buffer.committed`` twice before each response
``ignore_appends_during_response``
                           drop ``input_text_buffer.append`` text received while a response
                           is being generated (the [OBS] quirk of protocol.md §5.6)
``stamp_deltas``           add ``"x_sent_monotonic": time.monotonic()`` to every delta
                           (CLOCK_MONOTONIC is system-wide on Linux, so a client on the same
                           machine can compare it with its own ``time.monotonic()``)
``enrollment_error``       ``(http_status, code)`` forced on the next ``enrollment_error_times``
                           enrollment calls (message: ``enrollment_error_message``)
=========================  ==================================================================

Counters: :class:`ServerStats` (``srv.stats()``) is a frozen snapshot of :class:`Counters`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["Counters", "FaultPlan", "Faults", "ServerStats"]


@dataclass(frozen=True)
class FaultPlan:
    """The knobs in force for one realtime session (an immutable snapshot)."""

    first_audio_delay_s: float = 0.0
    delta_interval_s: float = 0.0
    drop_after_deltas: int | None = None
    close_after_deltas: int | None = None
    close_code: int = 1011
    close_reason: str = "fault injected"
    error_event_at: str | None = None
    error_code: str = "InternalError"
    error_message: str = "Injected fault."
    error_close_code: int | None = None
    stall_after_deltas: int | None = None
    refuse_handshake: int | None = None
    omit_committed: bool = False
    duplicate_committed: bool = False
    ignore_appends_during_response: bool = False
    stamp_deltas: bool = False

    @property
    def active(self) -> bool:
        """True when any knob differs from its default."""
        return self != _NO_FAULTS

    @property
    def error_delta(self) -> int | None:
        """N of ``error_event_at="delta:N"``, else None."""
        at = self.error_event_at
        if at is not None and at.startswith("delta:"):
            return int(at.split(":", 1)[1])
        return None


_NO_FAULTS = FaultPlan()
_SESSION_KNOBS = tuple(f.name for f in dataclasses.fields(FaultPlan))
_ERROR_STEPS = ("session.created", "session.update", "append", "commit", "clear", "finish")


class Faults:
    """Mutable fault knobs, consumed by the next ``times`` sessions (see module docstring)."""

    # Declared for mypy; values live in instance attributes set by reset().
    first_audio_delay_s: float
    delta_interval_s: float
    drop_after_deltas: int | None
    close_after_deltas: int | None
    close_code: int
    close_reason: str
    error_event_at: str | None
    error_code: str
    error_message: str
    error_close_code: int | None
    stall_after_deltas: int | None
    refuse_handshake: int | None
    omit_committed: bool
    duplicate_committed: bool
    ignore_appends_during_response: bool
    stamp_deltas: bool
    times: int | None
    enrollment_error: tuple[int, str] | None
    enrollment_error_message: str
    enrollment_error_times: int

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Turn every knob off."""
        for name in _SESSION_KNOBS:
            setattr(self, name, getattr(_NO_FAULTS, name))
        self.times = None
        self.reset_enrollment()

    def reset_enrollment(self) -> None:
        """Turn the enrollment knob off."""
        self.enrollment_error = None
        self.enrollment_error_message = "Injected fault."
        self.enrollment_error_times = 1

    def set(self, *, times: int | None = None, **knobs: Any) -> Faults:
        """Set several knobs at once (unknown names raise ``AttributeError``); returns self.

        ``times`` applies to the session knobs; a call that sets only ``enrollment_error*``
        knobs (and no ``times``) leaves the session knobs' ``times`` alone.
        """
        session = False
        for name, value in knobs.items():
            if name in _SESSION_KNOBS:
                session = True
            elif not name.startswith("enrollment_error"):
                raise AttributeError(f"unknown fault knob {name!r}")
            setattr(self, name, value)
        if session or times is not None:
            self.times = times
        return self

    def plan(self) -> FaultPlan:
        """The current session knobs, without consuming a use."""
        plan = FaultPlan(**{name: getattr(self, name) for name in _SESSION_KNOBS})
        at = plan.error_event_at
        if at is not None and at not in _ERROR_STEPS:
            if plan.error_delta is None:  # raises ValueError on "delta:x"
                raise ValueError(f"unknown error_event_at step {at!r}")
        return plan

    def take_session(self) -> FaultPlan:
        """The plan for a new session; counts one use of ``times``."""
        plan = self.plan()
        if not plan.active:
            return _NO_FAULTS
        if self.times is not None:
            self.times -= 1
            if self.times <= 0:
                enrollment = (
                    self.enrollment_error,
                    self.enrollment_error_message,
                    self.enrollment_error_times,
                )
                self.reset()
                (
                    self.enrollment_error,
                    self.enrollment_error_message,
                    self.enrollment_error_times,
                ) = enrollment
        return plan

    def take_enrollment(self) -> tuple[int, str, str] | None:
        """``(status, code, message)`` to force on this enrollment call, or None."""
        forced = self.enrollment_error
        if forced is None:
            return None
        self.enrollment_error_times -= 1
        message = self.enrollment_error_message
        if self.enrollment_error_times <= 0:
            self.reset_enrollment()
        return forced[0], forced[1], message


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of the server's counters (``srv.stats()``)."""

    http_requests: int = 0  # enrollment calls, including refused ones
    voices_created: int = 0
    handshakes: int = 0  # WebSocket upgrade attempts, including refused ones
    handshakes_refused: int = 0
    sessions_opened: int = 0  # upgrades that succeeded
    sessions_active: int = 0
    sessions_finished: int = 0  # sessions that sent session.finished
    responses: int = 0  # response.done sent
    deltas_sent: int = 0
    audio_samples_sent: int = 0
    client_events: int = 0
    errors_sent: int = 0
    # pacing="realtime": deltas sent more than 20 / 50 ms after their due time on the
    # session's own schedule (the server fell behind: its loop was busy or starved, or the
    # client did not read and flow control held the response back)
    deltas_late_20ms: int = 0
    deltas_late_50ms: int = 0


@dataclass(slots=True)
class Counters:
    """Mutable counters behind :class:`ServerStats` (one event loop, so no locking)."""

    http_requests: int = 0
    voices_created: int = 0
    handshakes: int = 0
    handshakes_refused: int = 0
    sessions_opened: int = 0
    sessions_active: int = 0
    sessions_finished: int = 0
    responses: int = 0
    deltas_sent: int = 0
    audio_samples_sent: int = 0
    client_events: int = 0
    errors_sent: int = 0
    deltas_late_20ms: int = 0
    deltas_late_50ms: int = 0

    def count_late(self, lateness_s: float) -> None:
        """A delta left ``lateness_s`` (> 20 ms) after its due time."""
        self.deltas_late_20ms += 1
        if lateness_s > 0.050:
            self.deltas_late_50ms += 1

    def snapshot(self) -> ServerStats:
        return ServerStats(**dataclasses.asdict(self))
