"""The one retry policy, carried by the exception (pure tier): ``retryable`` and ``retry_after``.

Enrollment and speech both ask the error; what each does with a wait is tested on loopback
elsewhere (tests/test_enrollment.py retries a 429 after its wait; tests/test_engine.py shows
a speech raising a 429 at once and retrying a 503).
"""

from __future__ import annotations

import pytest

from tts_stream import errors
from tts_stream.errors import (
    RATE_LIMIT_WAIT_S,
    ConnectionFailed,
    ConnectionLost,
    HandshakeRejected,
    ProtocolViolation,
    Timeout,
    TtsStreamError,
    UsageError,
    server_error,
)


@pytest.mark.parametrize(
    ("exc", "retryable", "retry_after"),
    [
        (ConnectionFailed("refused"), True, 0.0),
        (ConnectionLost("dropped", code=1006), True, 0.0),
        (HandshakeRejected(503), True, 0.0),
        (HandshakeRejected(400), False, 0.0),
        (Timeout("session.updated", 5.0), True, 0.0),
        (server_error("busy", status=503), True, 0.0),
        (server_error("bad", status=400, code="InvalidParameter"), False, 0.0),
        (server_error("who", status=401), False, 0.0),
        (server_error("slow down", status=429), True, RATE_LIMIT_WAIT_S),
        (server_error("slow down", code="Throttling.RateQuota", retry_after=0.25), True, 0.25),
        (server_error("full", status=400, code="Throttling.AllocationQuota"), False, 0.0),
        (server_error("gone", status=400, code="BadRequest.VoiceNotFound"), False, 0.0),
        (server_error("engine", code="InternalError"), False, 0.0),
        (ProtocolViolation("garbage"), False, 0.0),
        (UsageError("misuse"), False, 0.0),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_every_error_says_whether_and_when_to_retry(
    exc: TtsStreamError, retryable: bool, retry_after: float
) -> None:
    assert (exc.retryable, exc.retry_after) == (retryable, retry_after)


def test_a_rate_limit_is_retryable_only_after_a_wait() -> None:
    err = server_error("slow down", status=429)
    assert isinstance(err, errors.RateLimited)
    assert err.retryable and err.retry_after >= 1.0  # limits are per minute (§5.10)
