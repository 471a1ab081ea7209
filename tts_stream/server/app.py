"""The local server's aiohttp application: voice enrollment over HTTP plus the realtime route.

Role: ``POST /api/v1/services/audio/tts/customization`` implemented as protocol.md §4 says
(envelope, actions create/list/delete, the error catalogue of §4.9 with its HTTP statuses,
``x-request-id`` = ``request_id``), API-key authentication shared with the realtime
endpoint, and the composition of both routes into one :class:`aiohttp.web.Application`.

Boundary: HTTP in, JSON out; clone samples are judged by :func:`tts_stream.samples.inspect_sample`
(in a bounded pool of ``max_inspections`` worker threads: decoding and VAD are CPU work, and a
flood of uploads must not starve an honest one), voices are kept by
:class:`~tts_stream.server.voices.VoiceStore`. The only outgoing request this module ever
makes is the download of an ``http(s)`` sample URL, and only from a loopback address
(127.0.0.0/8, ::1, ``localhost``), only for a client that itself connects from a loopback
address (so ``--host 0.0.0.0`` does not open the host's loopback ports to the network),
without redirects, proxies, or more than the 10 MB cap.

Choices where §4 is silent: a wrong ``model`` is 400 ``InvalidParameter`` "Model not exist.";
an unknown action is 400 ``InvalidParameter``; a bad base64 payload is ``InvalidParameter``; a
body over the size cap is 400 ``InvalidParameter``; ``text`` is accepted but not compared with
the audio (there is no recogniser here); top-level ``parameters`` is ignored; a body that
does not arrive within ``body_timeout_s`` is 408 ``RequestTimeout``; a body that cannot be
decoded (a ``Content-Encoding`` that does not match it) is 400 ``BadRequest.IllegalInput``;
bodies over ``large_body_bytes`` are read and inspected ``max_uploads`` at a time (a wait for a
turn longer than ``body_timeout_s`` is 503 ``ServiceUnavailable``), which bounds the memory a
flood of uploads can take.
"""

from __future__ import annotations

import asyncio
import binascii
import concurrent.futures
import hashlib
import ipaddress
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp
import orjson
import pybase64
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from ..messages import (
    ENROLLMENT_LANGUAGES,
    ENROLLMENT_MODEL,
    ENROLLMENT_PATH,
    MAX_PAGE,
    REALTIME_PATH,
    VC_MODELS,
)
from ..samples import ERROR_CODES, SampleReport, inspect_sample
from .faults import Counters, Faults
from .likeness import sample_features
from .listener import RateLimitedLog
from .realtime import RealtimeConfig, RealtimeService
from .synth import Synthesizer
from .voices import PREFERRED_NAME_RE, QuotaFull, VoiceStore, format_gmt, key_hash

__all__ = ["EnrollmentConfig", "ServerApp", "is_loopback_host"]

log = logging.getLogger(__name__)

_AUDIO_MIMES = ("audio/wav", "audio/mpeg", "audio/mp4")
_DATA_URI = re.compile(r"^data:([A-Za-z0-9.+/-]+);base64,", re.ASCII)
_MSG_PARAM = "Required parameter({}) missing or invalid, please check the request parameters."


@dataclass(frozen=True, kw_only=True)
class EnrollmentConfig:
    """Limits of the enrollment endpoint."""

    quota: int = 1000
    retention_s: float = 365 * 86400.0
    max_audio_bytes: int = 10 * 1024 * 1024  # §4.7: encoded data URI or downloaded file
    url_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this
    max_inspections: int = 2  # sample decodings/analyses running at once (worker threads)
    max_uploads: int = 4  # large bodies read, decoded and inspected at once
    large_body_bytes: int = 1024 * 1024  # smaller bodies (list, delete, short samples) skip that

    @property
    def max_body_bytes(self) -> int:
        """Room for twice the 10 MB data-URI limit, so that a too-large sample still gets the
        documented BadRequest.InputDownloadFailed; beyond that a plain 400 InvalidParameter."""
        return 2 * self.max_audio_bytes + 1024 * 1024


class _Fail(Exception):
    """An enrollment error answer: HTTP status, DashScope code, message."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message
        self.close = close  # the rest of the body was not read: close the connection


class _Gone(Exception):
    """The client disconnected before its request was read: nobody to answer."""


def _fail(status: int, code: str, message: str, *, close: bool = False) -> NoReturn:
    raise _Fail(status, code, message, close=close)


def _bad_param(name: str, detail: str = "") -> NoReturn:
    _fail(400, "InvalidParameter", _MSG_PARAM.format(name) + (f" {detail}" if detail else ""))


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and literal addresses in 127.0.0.0/8 or ::1."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerApp:
    """State shared by both endpoints, and the aiohttp application built from it."""

    def __init__(
        self,
        *,
        store: VoiceStore,
        synthesizer: Synthesizer,
        faults: Faults,
        counters: Counters,
        clock: Callable[[], float],
        realtime: RealtimeConfig,
        enrollment: EnrollmentConfig,
    ) -> None:
        self.store = store
        self.faults = faults
        self.counters = counters
        self.clock = clock
        self.enrollment = enrollment
        self._key_hashes: set[str] = set()
        self._inspector = concurrent.futures.ThreadPoolExecutor(
            max_workers=enrollment.max_inspections, thread_name_prefix="tts-stream-inspect"
        )
        self._uploads = asyncio.Semaphore(enrollment.max_uploads)
        self._gone_log = RateLimitedLog(log)
        self.realtime = RealtimeService(
            config=realtime,
            store=store,
            synthesizer=synthesizer,
            faults=faults,
            counters=counters,
            authenticate=self.authenticate,
            clock=clock,
        )

    def add_key(self, api_key: str) -> None:
        """Accept ``api_key`` from now on (only its hash is kept)."""
        self._key_hashes.add(key_hash(api_key))

    def authenticate(self, authorization: str | None) -> str | None:
        """The owner id (key hash) for an ``Authorization: Bearer`` header, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return digest if digest in self._key_hashes else None

    def build(self) -> web.Application:
        """The aiohttp application with both routes."""
        app = web.Application(client_max_size=self.enrollment.max_body_bytes)
        app.router.add_post(ENROLLMENT_PATH, self.handle_enrollment)
        app.router.add_get(REALTIME_PATH, self.realtime.handle)

        async def on_shutdown(_: web.Application) -> None:
            await self.realtime.close_all()

        async def on_cleanup(_: web.Application) -> None:
            # Running inspections finish in their threads (bounded: 61 s of audio at most).
            self._inspector.shutdown(wait=False, cancel_futures=True)

        app.on_shutdown.append(on_shutdown)
        app.on_cleanup.append(on_cleanup)
        return app

    # --- enrollment -----------------------------------------------------------------------------

    async def handle_enrollment(self, request: web.Request) -> web.Response:
        """``POST /api/v1/services/audio/tts/customization`` (§4)."""
        self.counters.http_requests += 1
        rid = str(uuid.uuid4())
        headers = {"x-request-id": rid}
        try:
            body = await self._enroll(request)
        except _Fail as f:
            err = {"request_id": rid, "code": f.code, "message": f.message}
            resp = web.Response(
                body=orjson.dumps(err), status=f.status, content_type="application/json",
                headers=headers,
            )  # fmt: skip
            if f.close:
                resp.force_close()
            return resp
        except _Gone as exc:
            self._gone_log.log(logging.INFO, "client %s left before its request was read: %s",
                               request.remote, exc)  # fmt: skip
            resp = web.Response(status=400)
            resp.force_close()
            return resp
        body["request_id"] = rid
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    async def _enroll(self, request: web.Request) -> dict[str, Any]:
        owner = self.authenticate(request.headers.get("Authorization"))
        if owner is None:
            _fail(401, "InvalidApiKey", "Invalid API-key provided.")
        forced = self.faults.take_enrollment()
        if forced is not None:
            _fail(*forced)
        length = request.content_length
        if length is not None and length <= self.enrollment.large_body_bytes:
            return await self._answer(owner, request)
        # A large (or chunked) body: wait for a turn, so that memory stays bounded.
        try:
            async with asyncio.timeout(self.enrollment.body_timeout_s):
                await self._uploads.acquire()
        except TimeoutError:
            _fail(503, "ServiceUnavailable",
                  f"The server is busy with {self.enrollment.max_uploads} other uploads; "
                  "retry later.", close=True)  # fmt: skip
        try:
            return await self._answer(owner, request)
        finally:
            self._uploads.release()

    async def _read_body(self, request: web.Request) -> bytearray:
        """The request body, within the size cap and ``body_timeout_s``, decoded (gzip...)."""
        limit, timeout = self.enrollment.max_body_bytes, self.enrollment.body_timeout_s
        too_large = (f"Request body too large: the audio must be under "
                     f"{self.enrollment.max_audio_bytes} bytes.")  # fmt: skip
        if (request.content_length or 0) > limit:
            _fail(400, "InvalidParameter", too_large, close=True)
        raw = bytearray()
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.content.iter_any():
                    raw += chunk
                    if len(raw) > limit:
                        _fail(400, "InvalidParameter", too_large, close=True)
        except TimeoutError:
            _fail(408, "RequestTimeout",
                  f"The request body did not arrive within {timeout:g} s "
                  f"({len(raw)} bytes received).", close=True)  # fmt: skip
        except RequestPayloadError as exc:
            if request.transport is None or request.transport.is_closing():
                raise _Gone(str(exc)) from exc
            encoding = request.headers.get("Content-Encoding", "")
            _fail(400, "BadRequest.IllegalInput",
                  "The input parameter requires json format: the body could not be decoded "
                  f"(Content-Encoding {encoding!r}: {exc}).", close=True)  # fmt: skip
        except ConnectionError as exc:
            raise _Gone(f"{type(exc).__name__}: {exc}") from exc
        return raw

    async def _answer(self, owner: str, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await self._read_body(request))
        except orjson.JSONDecodeError:
            _fail(400, "BadRequest.IllegalInput", "The input parameter requires json format.")
        if not isinstance(body, dict):
            _fail(400, "BadRequest.IllegalInput", "The input parameter requires json format.")
        model = body.get("model")
        if model is None or model == "":
            _fail(400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.')
        if model != ENROLLMENT_MODEL:
            _fail(400, "InvalidParameter", "Model not exist.")
        inp = body.get("input")
        if inp is None:
            _fail(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
        if not isinstance(inp, dict):
            _bad_param("input")
        self.store.purge(now=self.clock())
        action = inp.get("action")
        if action == "create":
            return await self._create(owner, inp, request.remote)
        if action == "list":
            return self._list(owner, inp)
        if action == "delete":
            return self._delete(owner, inp)
        _bad_param("action", f"Unsupported action {action!r}; use 'create', 'list' or 'delete'.")

    async def _create(
        self, owner: str, inp: Mapping[str, Any], client: str | None
    ) -> dict[str, Any]:
        target_model = inp.get("target_model")
        if target_model not in VC_MODELS:
            _bad_param("target_model", f"Supported: {', '.join(VC_MODELS)}.")
        preferred = inp.get("preferred_name")
        if not isinstance(preferred, str) or not PREFERRED_NAME_RE.fullmatch(preferred):
            _bad_param("preferred_name", "Use 1-16 ASCII letters, digits or underscores.")
        audio = inp.get("audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        if not isinstance(data, str) or not data:
            _bad_param("audio.data")
        text = inp.get("text")
        if text is not None and not isinstance(text, str):
            _bad_param("text")
        language = inp.get("language")
        if language is not None and language not in ENROLLMENT_LANGUAGES:
            _bad_param("language", f"Supported: {', '.join(ENROLLMENT_LANGUAGES)}.")
        if self.store.count(owner) >= self.store.quota:  # cheap early answer; exact check below
            _quota_full()
        sample = await self._load_audio(data, client)
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._inspector, inspect_sample, sample)
        if not report.ok:
            code, message = _problem_answer(report)
            _fail(400, code, message)
        pitch = report.pitch_hz
        features = await loop.run_in_executor(self._inspector, sample_features, sample)
        try:
            voice = self.store.create(
                owner,
                preferred_name=preferred,
                target_model=target_model,
                language=language,
                pitch_hz=float(pitch) if pitch is not None else None,
                now=self.clock(),
                features=features,
            )
        except QuotaFull:
            _quota_full()
        self.counters.voices_created += 1
        log.info("created voice %s for %s", voice.name, target_model)
        return {
            "output": {"voice": voice.name, "target_model": voice.target_model,
                       "fallback_mode": False},
            "usage": {"count": 1},
        }  # fmt: skip

    async def _load_audio(self, data: str, client: str | None) -> bytes:
        """The sample's bytes from a data URI, or downloaded from a loopback URL, but only for
        a client on this machine: a server bound to a public address must not let remote
        clients probe the host's loopback ports (issue 9.9)."""
        limit = self.enrollment.max_audio_bytes
        m = _DATA_URI.match(data)
        if m is not None:
            mime = m.group(1).lower()
            if mime not in _AUDIO_MIMES:
                _bad_param("audio.data", f"Unsupported MIME type {mime!r}; use "
                           f"{', '.join(_AUDIO_MIMES)}.")  # fmt: skip
            if len(data) >= limit:
                code, message = ERROR_CODES["data_uri_size"]
                _fail(400, code, f"{message} (the data URI is {len(data)} characters; it must "
                      f"be under {limit})")  # fmt: skip
            try:
                return bytes(pybase64.b64decode(data[m.end() :], validate=True))
            except (binascii.Error, ValueError):
                _bad_param("audio.data", "The payload is not valid base64.")
        if data.startswith("data:"):
            _bad_param("audio.data", "Expected data:<mime>;base64,<payload>.")
        parts = urlsplit(data)
        if parts.scheme not in ("http", "https"):
            _bad_param("audio.data", "Expected a data URI or an http(s) URL.")
        if not is_loopback_host(client):
            _fail(400, "BadRequest.InputDownloadFailed",
                  "Failed to download the input file: the local server fetches sample URLs "
                  f"only for clients on this machine, and {client!r} is not; send the audio "
                  "as a data URI instead.")  # fmt: skip
        if not is_loopback_host(parts.hostname):
            _fail(400, "BadRequest.InputDownloadFailed",
                  "Failed to download the input file: the local server only fetches URLs on "
                  "loopback addresses (127.0.0.0/8, ::1, localhost), so it did not fetch "
                  f"{parts.hostname!r}; send the audio as a data URI instead.")  # fmt: skip
        return await self._download(data, limit)

    async def _download(self, url: str, limit: int) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.enrollment.url_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, trust_env=False) as http,
                http.get(url, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    _fail(400, "BadRequest.InputDownloadFailed",
                          f"Failed to download the input file: HTTP {resp.status}.")  # fmt: skip
                out = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    out += chunk
                    if len(out) > limit:
                        _fail(400, "BadRequest.InputDownloadFailed",
                              "Failed to download the input file: larger than "
                              f"{limit} bytes.")  # fmt: skip
                return bytes(out)
        except (aiohttp.ClientError, TimeoutError) as exc:
            _fail(400, "BadRequest.InputDownloadFailed",
                  f"Failed to download the input file: {type(exc).__name__}.")  # fmt: skip

    def _list(self, owner: str, inp: Mapping[str, Any]) -> dict[str, Any]:
        page_index = inp.get("page_index", 0)
        page_size = inp.get("page_size", 10)
        for name, value in (("page_index", page_index), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PAGE:
                _bad_param(name, f"Expected an integer in [0, {MAX_PAGE}].")
        voices, total = self.store.page(owner, page_index=page_index, page_size=page_size)
        items = []
        for v in voices:
            item: dict[str, Any] = {
                "voice": v.name,
                "gmt_create": format_gmt(v.created_ms),
                "gmt_modified": format_gmt(v.modified_ms),
                "target_model": v.target_model,
            }
            if v.language is not None:
                item["language"] = v.language
            items.append(item)
        return {
            "output": {"page_index": page_index, "page_size": page_size, "total_count": total,
                       "voice_list": items},
            "usage": {"count": 0},
        }  # fmt: skip

    def _delete(self, owner: str, inp: Mapping[str, Any]) -> dict[str, Any]:
        name = inp.get("voice")
        if not isinstance(name, str) or not name:
            _bad_param("voice")
        if not self.store.delete(owner, name):
            _fail(400, "BadRequest.VoiceNotFound", f"Voice '{name}' not found.")
        return {"output": {"voice": name}, "usage": {"count": 0}}


def _quota_full() -> NoReturn:
    _fail(400, "Throttling.AllocationQuota",
          "Maximum voice storage limit exceeded, please delete existing voices.")  # fmt: skip


def _problem_answer(report: SampleReport) -> tuple[str, str]:
    """(code, message) of the first problem, through ``samples.ERROR_CODES`` (§4.9)."""
    problem = report.problems[0]
    default = ("Audio.PreprocessError", "Audio preprocess error.")
    code, message = ERROR_CODES.get(problem.rule, default)
    return code, f"{message} ({problem.message})" if problem.message else message
