"""Voice enrollment client: clone, list, count and delete voices (``qwen-voice-enrollment``).

Role: the HTTP side of the service (protocol.md §4) over an aiohttp ``ClientSession`` that
the caller owns (the Engine). Request bodies and response parsing come from the pure
:mod:`tts_stream.messages`; sample checks from :mod:`tts_stream.samples`; URLs and headers
from :class:`tts_stream.config.Endpoint`. This module adds the I/O policy: one timeout per
request, retries with capped exponential backoff and full jitter where they are safe, and
the translation of aiohttp exceptions and HTTP errors into :mod:`tts_stream.errors` at one
boundary (``_send_once``).

Retry policy (why):

* ``list`` and ``delete`` are retried on 408/409/429/5xx, timeouts and connection errors:
  listing has no effect, and deleting twice only risks ``BadRequest.VoiceNotFound`` on the
  second try, which is then known to mean "already deleted by the first try".
* ``create`` costs money and a 5xx, a timeout or a connection dropped after the request was
  sent may each have created (and billed) a voice, so those are never retried (§4.1).
  ``create`` is retried only when the request provably did nothing: the TCP/TLS connection
  could not be opened at all (nothing was sent), or HTTP 429, which the gateway's rate
  limiter returns before the request reaches the voice service (failed creations are not
  billed, §4.8).
* Whether an error is worth another try is the error's own ``retryable`` (the one policy of
  :mod:`tts_stream.errors`, shared with speech). ``Retry-After`` / ``retry-after-ms``, or
  else the error's ``retry_after`` (a rate limit without the header: 1 s), raise the
  jittered delay to at least that figure, still capped by ``RetryPolicy.max_delay`` so
  that no call blocks for long.

The API key never appears in a log record, an exception message or a ``repr``: it is only
ever read by :meth:`Endpoint.headers`, and everything taken from a response (the body, the
``x-request-id`` header, the reason phrase; so ``message``, ``code`` and ``request_id`` of
errors) is passed through :func:`~tts_stream.errors.redact` in case a server echoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .config import Endpoint
from .errors import (
    ConnectionFailed,
    ProtocolViolation,
    SampleRejected,
    ServerError,
    Timeout,
    TtsStreamError,
    UsageError,
    VoiceNotFound,
    redact,
    server_error,
)
from .messages import (
    ENROLLMENT_LANGUAGES,
    ENROLLMENT_PATH,
    MAX_PAGE,
    VC_MODELS,
    CreatedVoice,
    VoiceInfo,
    VoicePage,
    create_voice_request,
    delete_voice_request,
    is_preferred_name,
    list_voices_request,
    parse_created_voice,
    parse_enrollment_error,
    parse_voice_page,
)
from .samples import data_uri, inspect_sample

__all__ = [
    "ENROLLMENT_LANGUAGES",
    "NO_RETRY",
    "Page",
    "RetryPolicy",
    "Voice",
    "Voices",
    "open_voices",
    "parse_retry_after",
    "validate_preferred_name",
]

log = logging.getLogger(__name__)

# The §4.3 range of page_index, MAX_PAGE, is also the guard against a server that never ends
# a listing.


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, full-jitter exponential backoff.

    The n-th retry (n = 0, 1, ...) waits ``u * min(max_delay, base_delay * 2**n)`` with
    ``u = jitter()`` in [0, 1), raised to the server's ``Retry-After`` when that is larger,
    and never more than ``max_delay``. Tests pass tiny delays or a fixed ``jitter``.
    """

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise UsageError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise UsageError("RetryPolicy delays must be >= 0")

    def delay(self, retry: int, *, u: float, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); pure."""
        d = u * min(self.max_delay, self.base_delay * 2.0**retry)
        if retry_after is not None:
            d = max(d, retry_after)
        return min(d, self.max_delay)


NO_RETRY = RetryPolicy(attempts=1)


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be delta-seconds or an HTTP date (RFC 9110 §10.2.3); ``now`` is the
    current wall-clock time (``time.time()``) for the date form. ``None`` when absent or
    unparseable; never negative.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def validate_preferred_name(name: object) -> str:
    """Return ``name`` if it is a valid ``preferred_name`` (§4.2), else raise UsageError."""
    if not is_preferred_name(name):
        raise UsageError(f"preferred_name must be 1-16 ASCII letters, digits or '_', got {name!r}")
    return name


@dataclass(frozen=True)
class Voice:
    """A cloned voice: what ``engine.speak(voice)`` takes; ``str(voice)`` is its name.

    ``target_model`` is the only realtime model the voice works with (§5.1); it is ``None``
    only when an old-shape list response omitted it. ``created`` is the server's
    ``gmt_create`` (``YYYY-MM-DD HH:MM:SS``, zone undocumented), ``None`` right after
    :meth:`Voices.create`. ``fallback_mode`` is true when the service cloned in a degraded
    way (poor audio or text mismatch); the voice exists and was billed.
    """

    name: str
    target_model: str | None
    language: str | None = None
    created: str | None = None
    fallback_mode: bool = False
    fallback_reason: str | None = None

    def __str__(self) -> str:
        return self.name


#: One page of :meth:`Voices.list` (a ``VoicePage[Voice]``); paging fields are ``None`` when
#: the server omits them.
Page = VoicePage


class _Failure(Exception):
    """One failed attempt, with what the retry decision needs. Never leaves this module."""

    def __init__(
        self,
        error: TtsStreamError,
        cause: BaseException | None = None,
        *,
        nothing_sent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(str(error))
        self.error, self.cause = error, cause
        # True when the connection could not even be opened: provably no effect.
        self.nothing_sent = nothing_sent
        self.retry_after = retry_after

    @property
    def status(self) -> int | None:
        return self.error.status if isinstance(self.error, ServerError) else None

    @property
    def transient(self) -> bool:
        """Worth retrying for an idempotent request: the error says (the one policy)."""
        return self.error.retryable

    @property
    def wait_at_least(self) -> float:
        """The server's ``Retry-After``, else the least wait the error itself names."""
        return self.retry_after if self.retry_after is not None else self.error.retry_after

    @property
    def outcome_unknown(self) -> bool:
        """The server may have carried the request out although we saw a failure."""
        return not self.nothing_sent and self.status != 429 and self.transient


class Voices:
    """Client of the voice enrollment API: ``create``, ``list``, ``all``, ``count``, ``delete``.

    ``session`` is owned by the caller (the Engine) and must outlive this object.
    ``timeout`` bounds each list/delete request (connect, send and the whole response);
    ``create_timeout`` bounds a create, which uploads up to 10 MB and waits for the clone.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: Endpoint,
        *,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
        timeout: float = 30.0,
        create_timeout: float = 120.0,
    ) -> None:
        if timeout <= 0 or create_timeout <= 0:
            raise UsageError("timeouts must be > 0 seconds")
        self._session = session
        self._endpoint = endpoint
        self._retry = retry
        self._timeout = timeout
        self._create_timeout = create_timeout

    def __repr__(self) -> str:
        return f"Voices({self._endpoint!r}, retry={self._retry!r})"

    @property
    def endpoint(self) -> Endpoint:
        """Where requests go (its repr never shows the key)."""
        return self._endpoint

    # --- public API -------------------------------------------------------------------

    async def create(
        self,
        sample: str | os.PathLike[str] | bytes,
        *,
        preferred_name: str,
        target_model: str = VC_MODELS[0],
        text: str | None = None,
        language: str | None = None,
        check: bool = True,
    ) -> Voice:
        """Clone a voice from a 10-20 s sample and return it (one billed creation).

        ``sample`` is a local file path, the file's bytes (WAV, MP3 or M4A), or an
        ``http(s)://`` URL string. A local sample is inspected first and, with
        ``check=True``, every violated requirement is reported at once in
        :class:`~tts_stream.errors.SampleRejected` without any network traffic. A URL is
        passed through as ``audio.data`` unchecked: the service downloads it, so nothing
        can be verified locally and its errors come back from the server.
        ``check=False`` sends a local sample even if the local rules reject it (the
        server has the last word); it must still be a recognisable audio container.

        ``text`` is the transcript (the server rejects a clip that disagrees with it);
        ``language`` is one of :data:`ENROLLMENT_LANGUAGES`.

        Never retried after the request may have reached the service (a 5xx may have
        created and billed a voice); retried only on connect failures and HTTP 429.

        Raises:
            UsageError: bad ``preferred_name``, ``target_model``, ``language`` or ``text``,
                or an unreadable file. SampleRejected: the sample breaks the rules.
            ServerError (and subclasses): the service refused; QuotaExceeded at 1000 voices.
            ConnectionFailed, Timeout, ProtocolViolation.
        """
        _check_create_options(preferred_name, target_model, language, text)
        audio = await _audio_data(sample, check=check)
        payload = create_voice_request(
            target_model=target_model,
            preferred_name=preferred_name,
            audio_data=audio,
            text=text,
            language=language,
        )
        body = await self._send("create", payload, idempotent=False, limit_s=self._create_timeout)
        assert body is not None  # only delete tolerates an already-done retry
        return _created_voice(parse_created_voice(body), target_model, language)

    async def list(self, page_index: int = 0, page_size: int = 10) -> Page[Voice]:
        """One page of the account's voices (``page_index`` is 0-based)."""
        if not _is_int(page_index) or not 0 <= page_index <= MAX_PAGE:
            raise UsageError(f"page_index must be an int in [0, {MAX_PAGE}]")
        if not _is_int(page_size) or not 1 <= page_size <= MAX_PAGE:
            # §8: older pages allowed 0, the newer range starts at 1; 0 lists nothing anyway.
            raise UsageError(f"page_size must be an int in [1, {MAX_PAGE}]")
        payload = list_voices_request(page_index=page_index, page_size=page_size)
        body = await self._send("list", payload, idempotent=True, limit_s=self._timeout)
        assert body is not None
        return parse_voice_page(body).map(_voice_from_info)

    async def all(self, page_size: int = 100) -> AsyncIterator[Voice]:
        """Every voice of the account, fetching page after page.

        Stops on a short page or once ``total_count`` voices were seen. Voices created or
        deleted meanwhile may be missed or seen twice (the API pages by offset).
        """
        async with contextlib.aclosing(self._pages(page_size)) as pages:
            async for page in pages:
                for voice in page.voices:
                    yield voice

    async def count(self, *, page_size: int = 100) -> int:
        """How many voices the account holds (the quota is 1000, §4.8).

        The API has no count call: this uses ``total_count`` when the server reports it,
        else pages through the whole list.
        """
        n = 0
        async with contextlib.aclosing(self._pages(page_size)) as pages:
            async for page in pages:
                if page.total_count is not None:
                    return page.total_count
                n += len(page.voices)
        return n

    async def find(self, name: str, *, page_size: int = 100) -> Voice:
        """The voice called ``name`` (pages through the list; the API has no query call).

        Raises :class:`~tts_stream.errors.VoiceNotFound` when the account has no such voice.
        """
        async for voice in self.all(page_size=page_size):
            if voice.name == name:
                return voice
        raise VoiceNotFound(f"Voice '{name}' not found.", code="BadRequest.VoiceNotFound")

    async def delete(self, voice: Voice | str, *, missing_ok: bool = False) -> bool:
        """Delete a voice and free its slot; ``True`` if this call deleted it.

        With ``missing_ok=True`` an unknown voice returns ``False`` instead of raising
        :class:`~tts_stream.errors.VoiceNotFound` (idempotent delete).
        """
        name = voice.name if isinstance(voice, Voice) else voice
        if not isinstance(name, str) or not name:
            raise UsageError(f"delete needs a Voice or a voice name, got {voice!r}")
        try:
            await self._send(
                "delete", delete_voice_request(name), idempotent=True, limit_s=self._timeout
            )
        except VoiceNotFound:
            if missing_ok:
                log.debug("voice %s already absent", name)
                return False
            raise
        log.info("deleted voice %s", name)
        return True

    # --- transport ----------------------------------------------------------------------

    async def _pages(self, page_size: int) -> AsyncGenerator[Page[Voice], None]:
        seen = 0
        for index in range(MAX_PAGE + 1):
            page = await self.list(index, page_size)
            yield page
            seen += len(page.voices)
            if len(page.voices) < page_size:
                return
            if page.total_count is not None and seen >= page.total_count:
                return
        raise ProtocolViolation(f"voice listing did not end after {MAX_PAGE} pages")

    async def _send(
        self, action: str, payload: dict[str, Any], *, idempotent: bool, limit_s: float
    ) -> dict[str, Any] | None:
        """POST with retries; returns the body, or ``None`` for a delete done by a retry."""
        policy = self._retry
        maybe_done = False
        for attempt in range(policy.attempts):
            try:
                return await self._send_once(action, payload, limit_s)
            except _Failure as f:
                err = f.error
                if maybe_done and isinstance(err, VoiceNotFound):
                    # An earlier try of this delete failed in a way that may have deleted
                    # the voice (§4.4): the voice is gone, which is what was asked.
                    log.info("enrollment %s: voice gone after an uncertain try", action)
                    return None
                maybe_done = maybe_done or f.outcome_unknown
                safe = f.nothing_sent or (f.transient and (idempotent or f.status == 429))
                if not safe or attempt + 1 >= policy.attempts:
                    raise err from f.cause
                delay = policy.delay(attempt, u=policy.jitter(), retry_after=f.wait_at_least)
                log.warning(
                    "enrollment %s failed (%s); retry %d/%d in %.3f s",
                    action,
                    err,
                    attempt + 1,
                    policy.attempts - 1,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send_once(
        self, action: str, payload: dict[str, Any], limit_s: float
    ) -> dict[str, Any]:
        """One POST; the single place where aiohttp and HTTP errors become ours."""
        started = time.monotonic()
        status, reason, resp_headers, raw = await self._post(action, payload, limit_s)
        key = self._endpoint.api_key
        if key and key.encode() in raw:  # a server that echoes the key: keep it out of all
            raw = raw.replace(key.encode(), b"sk-***")
        header_rid = resp_headers.get("x-request-id")
        header_rid = redact(header_rid, key) if header_rid is not None else None
        reason = redact(reason, key) if reason is not None else None
        body = _loads(raw)
        log.debug(
            "enrollment %s -> HTTP %d in %.0f ms (request_id=%s)",
            action,
            status,
            (time.monotonic() - started) * 1000.0,
            body.get("request_id", header_rid) if isinstance(body, dict) else header_rid,
        )
        if not 200 <= status < 300:
            raise _Failure(
                self._server_error(body, status, reason, header_rid),
                retry_after=parse_retry_after(resp_headers, now=time.time()),
            )
        if not isinstance(body, dict):
            raise _Failure(
                ProtocolViolation(
                    f"enrollment {action}: HTTP {status} with a body that is not a JSON object"
                    f" ({len(raw)} bytes, request_id={header_rid})"
                )
            )
        code = body.get("code")
        if "output" not in body and isinstance(code, str) and code:
            # The SDK's generic DashScope rule (§4.1): a 200 carrying an error code failed.
            raise _Failure(self._server_error(body, status, reason, header_rid))
        if action != "delete" and not isinstance(body.get("output"), dict):
            # delete's older shape has no output (§4.4); create and list need it.
            raise _Failure(
                ProtocolViolation(
                    f"enrollment {action}: HTTP {status} without an 'output' object "
                    f"(request_id={body.get('request_id', header_rid)})"
                )
            )
        if header_rid and "request_id" not in body:
            body["request_id"] = header_rid
        return body

    async def _post(
        self, action: str, payload: dict[str, Any], limit_s: float
    ) -> tuple[int, str | None, Mapping[str, str], bytes]:
        """The HTTP exchange of one try: status, reason, headers and body, or a _Failure."""
        url = self._endpoint.http_url(ENROLLMENT_PATH)
        headers = self._endpoint.headers()
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "application/json"
        data = orjson.dumps(payload)
        try:
            async with asyncio.timeout(limit_s):
                # No redirects: a POST API has no reason to redirect, and following one
                # could carry the Authorization header to another host.
                async with self._session.post(
                    url, data=data, headers=headers, allow_redirects=False
                ) as resp:
                    raw = await resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.headers
        except TimeoutError as exc:
            raise _Failure(Timeout(f"enrollment {action} response", limit_s), exc) from None
        except aiohttp.ClientSSLError as exc:
            # Certificate or TLS failure: deterministic, nothing to retry.
            raise _Failure(ConnectionFailed(f"TLS failure talking to {url}: {exc}"), exc) from None
        except aiohttp.ClientConnectorError as exc:
            raise _Failure(
                ConnectionFailed(f"cannot connect to {url}: {exc.os_error or exc}"),
                exc,
                nothing_sent=True,
            ) from None
        except aiohttp.ClientResponseError as exc:
            # Its repr carries the request headers (the key): keep it out of the chain.
            raise _Failure(
                ConnectionFailed(f"bad HTTP response from {url}: HTTP {exc.status} {exc.message}")
            ) from None
        except aiohttp.ClientError as exc:
            raise _Failure(
                ConnectionFailed(f"{action} to {url} failed: {type(exc).__name__}: {exc}"),
                exc,
            ) from None
        return status, reason, resp_headers, raw

    def _server_error(
        self, body: Any, status: int, reason: str | None, header_rid: str | None
    ) -> ServerError:
        # A server could echo the key back in any field (an "invalid key: sk-..." text).
        info = parse_enrollment_error(body, request_id=header_rid).redacted(self._endpoint.api_key)
        return server_error(
            info.message.strip() or f"HTTP {status} {reason or ''}".strip(),
            code=info.code,
            status=status,
            request_id=info.request_id,
        )


@contextlib.asynccontextmanager
async def open_voices(
    endpoint: Endpoint,
    *,
    retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
    timeout: float = 30.0,  # noqa: ASYNC109 - per request, passed on to Voices
    create_timeout: float = 120.0,
) -> AsyncIterator[Voices]:
    """A :class:`Voices` with its own HTTP session, for callers without an Engine (the CLI)::

    async with open_voices(Endpoint.resolve()) as voices:
        print(await voices.count())
    """
    async with aiohttp.ClientSession() as session:
        yield Voices(session, endpoint, retry=retry, timeout=timeout, create_timeout=create_timeout)


def _check_create_options(
    preferred_name: str, target_model: str, language: str | None, text: str | None
) -> None:
    """The local checks of a create's options (§4.2), before anything is read or sent."""
    validate_preferred_name(preferred_name)
    if target_model not in VC_MODELS:
        raise UsageError(
            f"target_model must be one of {', '.join(VC_MODELS)}, got {target_model!r}"
        )
    if language is not None and language not in ENROLLMENT_LANGUAGES:
        raise UsageError(
            f"language must be one of {', '.join(ENROLLMENT_LANGUAGES)} "
            f"(the clip's language), got {language!r}"
        )
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise UsageError("text, when given, must be the non-empty transcript of the clip")


def _created_voice(created: CreatedVoice, target_model: str, language: str | None) -> Voice:
    """The :class:`Voice` of a create's answer, logging what the caller should know."""
    if created.target_model and created.target_model != target_model:
        log.warning(
            "voice %s was bound to %s, not the requested %s",
            created.voice,
            created.target_model,
            target_model,
        )
    if created.fallback_mode:
        log.warning(
            "voice %s was cloned in fallback mode (%s): expect lower quality",
            created.voice,
            created.fallback_reason or "no reason given",
        )
    log.info("created voice %s for %s", created.voice, created.target_model or target_model)
    return Voice(
        name=created.voice,
        target_model=created.target_model or target_model,
        language=language,
        created=None,
        fallback_mode=created.fallback_mode,
        fallback_reason=created.fallback_reason,
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _loads(raw: bytes) -> Any:
    """Liberal JSON: empty or non-JSON bodies (seen on workspace hosts, §9.15) give None."""
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _voice_from_info(info: VoiceInfo) -> Voice:
    return Voice(
        name=info.voice,
        target_model=info.target_model,
        language=info.language,
        created=info.gmt_create,
    )


async def _audio_data(sample: str | os.PathLike[str] | bytes, *, check: bool) -> str:
    """``audio.data`` for a create: the URL as is, or a data URI of the checked sample."""
    if isinstance(sample, str) and sample[:8].lower().startswith(("http://", "https://")):
        return sample
    if not isinstance(sample, (bytes, bytearray, memoryview, str, os.PathLike)):
        raise UsageError(
            f"sample must be a path, bytes or an http(s) URL, not {type(sample).__name__}"
        )
    # inspect_sample reads a path itself, at most a little over the size limit, so a huge
    # file is refused without loading it; the bytes are read only once it passed.
    report = await asyncio.to_thread(inspect_sample, sample)
    if not report.ok:
        if check:
            raise SampleRejected(report)
        log.warning("sending a sample that fails local checks (check=False): %s", report.problems)
    if report.mime is None:
        raise SampleRejected(report)
    if isinstance(sample, (str, os.PathLike)):
        path = Path(sample)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise UsageError(f"cannot read clone sample {str(path)!r}: {exc.strerror}") from exc
    else:
        data = bytes(sample)
    return data_uri(data, report.mime)
