"""The one exception tree of tts-stream.

Every error the library raises derives from :class:`TtsStreamError`. Third-party exceptions
(aiohttp, picows, PyAV, PortAudio) are translated at one boundary with ``raise ... from``.
Secrets (API keys) never appear in ``str()`` or ``repr()`` of any of these::

    TtsStreamError
    ├── UsageError                 local misuse: the caller can fix it, nothing was sent
    │   ├── SampleRejected         a clone sample breaks the requirements (.report)
    │   ├── ModelMismatch          voice enrolled for another target_model
    │   ├── ClosedError            write/push after close
    │   └── MissingDependency      an optional extra or system library is not installed
    ├── ProtocolViolation          the peer sent something the protocol does not allow
    ├── ConnectionFailed           could not connect, or the connection broke
    │   ├── HandshakeRejected      the WebSocket upgrade got an HTTP status (.status)
    │   └── ConnectionLost         closed before the session finished (.code, .reason)
    ├── DeviceError                a sound-card device failed to open or to play
    ├── ServerError                the server reported an error (.code .message .status
    │   │                          .request_id .retryable)
    │   ├── AuthenticationError    401 / 403
    │   ├── RateLimited            429, Throttling*
    │   ├── VoiceNotFound          BadRequest.VoiceNotFound
    │   └── QuotaExceeded          Throttling.AllocationQuota
    └── Timeout                    a bounded wait ran out (.what, .seconds)

One retry policy, carried by the exception (asked by enrollment and speech alike):
``exc.retryable`` says whether the same request may succeed when tried again (a transient
failure: a dropped or refused connection, a 5xx, a timeout, a rate limit), and
``exc.retry_after`` how long to wait first, at least (seconds; 0 for "at once"). A rate
limit (429, ``Throttling*``) is retryable but only after a wait: the server's
``Retry-After`` when it sent one, else :data:`RATE_LIMIT_WAIT_S` (limits are per minute,
possibly enforced per second, protocol.md §4.8 and §5.10). A caller that cannot wait that
long (a speech: it is real time) raises the error at once instead of retrying too soon,
which would only count as another request against the same limit.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClosedError",
    "ConnectionFailed",
    "ConnectionLost",
    "DeviceError",
    "HandshakeRejected",
    "MissingDependency",
    "ModelMismatch",
    "ProtocolViolation",
    "QuotaExceeded",
    "RateLimited",
    "SampleRejected",
    "ServerError",
    "Timeout",
    "TtsStreamError",
    "UsageError",
    "VoiceNotFound",
    "RATE_LIMIT_WAIT_S",
    "redact",
    "server_error",
]

#: The wait before retrying a rate-limited request when the server named none: the limits
#: are per minute and may be enforced per second (protocol.md §4.8, §5.10).
RATE_LIMIT_WAIT_S = 1.0


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every non-empty secret replaced by ``sk-***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "sk-***")
    return text


class TtsStreamError(Exception):
    """Base class of every error raised by tts-stream.

    ``retryable`` and ``retry_after`` are the one retry policy (see the module docstring):
    whether the same request may succeed when tried again, and the least wait before it.
    """

    @property
    def retryable(self) -> bool:
        """Whether trying the same request again may succeed (False: it would fail again)."""
        return False

    @property
    def retry_after(self) -> float:
        """Seconds to wait at least before a retry can succeed (0: at once)."""
        return 0.0


class UsageError(TtsStreamError, ValueError):
    """The caller misused the API; nothing was sent over the network."""


class SampleRejected(UsageError):
    """A clone sample breaks one or more requirements; ``report`` lists every violation."""

    def __init__(self, report: object) -> None:
        self.report = report
        problems = getattr(report, "problems", ())
        lines = "; ".join(str(p) for p in problems) or "sample rejected"
        super().__init__(f"clone sample rejected: {lines}")


class ModelMismatch(UsageError):
    """The voice was enrolled for another target model than the one requested."""

    def __init__(self, voice: str, voice_model: str, model: str) -> None:
        self.voice, self.voice_model, self.model = voice, voice_model, model
        super().__init__(
            f"voice {voice!r} was enrolled for {voice_model!r}, not {model!r}; "
            f"connect with model={voice_model!r} or enroll the sample again for {model!r}"
        )


class ClosedError(UsageError):
    """The object was used after it was closed."""


class MissingDependency(UsageError, ImportError):
    """An optional dependency is missing; the message names what to install."""


class ProtocolViolation(TtsStreamError):
    """The peer sent something the protocol does not allow (malformed JSON, bad event)."""


class ConnectionFailed(TtsStreamError):
    """Could not connect to the service, or the connection broke."""

    @property
    def retryable(self) -> bool:
        """A fresh connection may work (a refused handshake says otherwise, see there)."""
        return True


class HandshakeRejected(ConnectionFailed):
    """The WebSocket upgrade was answered with an HTTP error status."""

    def __init__(self, status: int, message: str = "", *, code: str | None = None) -> None:
        self.status, self.code = status, code
        super().__init__(
            f"handshake rejected with HTTP {status}" + (f": {message}" if message else "")
        )

    @property
    def retryable(self) -> bool:
        """Only a server-side status (5xx) may go away; a 4xx would be answered again."""
        return self.status >= 500


class ConnectionLost(ConnectionFailed):
    """The connection closed before the session finished.

    ``audio_received`` tells whether any audio had already reached the sinks (then the
    engine never retries, so no speech is ever repeated).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        reason: str = "",
        audio_received: bool = False,
    ) -> None:
        self.code, self.reason, self.audio_received = code, reason, audio_received
        super().__init__(message)


class DeviceError(TtsStreamError):
    """A sound-card device could not be opened or failed while playing (PortAudio)."""


class ServerError(TtsStreamError):
    """The server reported an error (enrollment HTTP error or realtime ``error`` event)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.message, self.code, self.status = message, code, status
        self.request_id, self._retryable = request_id, retryable
        self._retry_after = retry_after
        parts = [p for p in (f"HTTP {status}" if status else None, code) if p]
        head = f"[{' '.join(parts)}] " if parts else ""
        tail = f" (request_id={request_id})" if request_id else ""
        super().__init__(f"{head}{message}{tail}")

    @property
    def retryable(self) -> bool:
        """Set by :func:`server_error` from the status and code (408/409/429/5xx)."""
        return self._retryable

    @property
    def retry_after(self) -> float:
        """The server's ``Retry-After`` when it sent one, else 0."""
        return self._retry_after or 0.0


class AuthenticationError(ServerError):
    """The API key is missing, invalid, or not allowed for this region/workspace/model."""


class RateLimited(ServerError):
    """The service throttled the request (HTTP 429 or a ``Throttling*`` code).

    Retryable, but only after :attr:`retry_after`: the server's ``Retry-After``, else
    :data:`RATE_LIMIT_WAIT_S`.
    """

    @property
    def retry_after(self) -> float:
        return self._retry_after if self._retry_after is not None else RATE_LIMIT_WAIT_S


class VoiceNotFound(ServerError):
    """The voice does not exist (or belongs to another account)."""


class QuotaExceeded(ServerError):
    """The account holds the maximum number of voices (1000); delete some first."""


class Timeout(TtsStreamError, TimeoutError):
    """A bounded wait ran out: ``what`` it waited for and after how many ``seconds``.

    ``inactivity`` is true when the limit is on time without progress (the waits of a
    speech), false for a plain deadline (connecting, a request).
    """

    def __init__(self, what: str, seconds: float, *, inactivity: bool = False) -> None:
        self.what, self.seconds, self.inactivity = what, seconds, inactivity
        if inactivity:
            # The limit is on silence (no audio, event or sink progress), not on the length.
            super().__init__(f"timed out waiting for {what}: {seconds:g} s without progress")
        else:
            super().__init__(f"timed out after {seconds:g} s waiting for {what}")

    @property
    def retryable(self) -> bool:
        """A wait that ran out may not run out again (a fresh connection, a quieter server)."""
        return True


_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def server_error(
    message: str,
    *,
    code: str | None = None,
    status: int | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> ServerError:
    """Build the most specific :class:`ServerError` for a code/status pair.

    ``retry_after``: the server's ``Retry-After`` in seconds, when it sent one.
    """
    code_s = code or ""
    cls: type[ServerError] = ServerError
    if (
        status in (401, 403)
        or code_s in ("InvalidApiKey", "AccessDenied")
        or code_s.endswith(".AccessDenied")
    ):
        cls = AuthenticationError
    elif code_s == "BadRequest.VoiceNotFound":
        cls = VoiceNotFound
    elif code_s == "Throttling.AllocationQuota":
        cls = QuotaExceeded
    elif status == 429 or code_s.startswith("Throttling"):
        cls = RateLimited
    retryable = cls is RateLimited or (status in _RETRYABLE_STATUS and cls is ServerError)
    return cls(
        message, code=code, status=status, request_id=request_id, retryable=retryable,
        retry_after=retry_after,
    )  # fmt: skip
