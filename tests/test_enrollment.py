"""Enrollment client and endpoint config: pure parts, then loopback against LocalServer.

Pure tier: Endpoint resolution/headers/redaction, RetryPolicy backoff, Retry-After parsing,
argument validation. Loopback tier: the real client (`Voices`) against the real local
server on 127.0.0.1, with faults from the server's `enrollment_error` knob and request
counts from `srv.stats()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from tts_stream import errors
from tts_stream.config import API_KEY_ENV, Endpoint
from tts_stream.enrollment import (
    NO_RETRY,
    Page,
    RetryPolicy,
    Voice,
    Voices,
    open_voices,
    parse_retry_after,
    validate_preferred_name,
)
from tts_stream.messages import ENROLLMENT_PATH, VC_MODELS
from tts_stream.samples import SampleReport
from tts_stream.server import LocalServer
from tts_stream.testing import samplegen

TIMEOUT = 20.0  # bound on every request in the loopback tests
KEY = "sk-test-0123456789abcdef0123456789abcdef"
FAST = RetryPolicy(attempts=3, base_delay=0.005, max_delay=0.02)
VOICE_NAME = re.compile(r"qwen-tts-vc-[A-Za-z0-9_]{1,16}-voice-\d{17}-[0-9a-f]{4}")


# --- Endpoint (pure) ------------------------------------------------------------------------


def test_endpoint_regions() -> None:
    intl = Endpoint.resolve(api_key=KEY, env={})
    assert intl.http_url("/api/v1/x") == "https://dashscope-intl.aliyuncs.com/api/v1/x"
    assert intl.ws_url(VC_MODELS[0]) == (
        f"wss://dashscope-intl.aliyuncs.com/api-ws/v1/realtime?model={VC_MODELS[0]}"
    )
    cn = Endpoint.resolve(api_key=KEY, region="cn", env={})
    assert cn.http_base == "https://dashscope.aliyuncs.com"
    assert cn.ws_base == "wss://dashscope.aliyuncs.com"
    with pytest.raises(errors.UsageError, match="region"):
        Endpoint.resolve(api_key=KEY, region="mars", env={})


def test_endpoint_base_url_and_env_key() -> None:
    ep = Endpoint.resolve(base_url="http://127.0.0.1:8000/", env={API_KEY_ENV: KEY})
    assert ep.http_url("api/v1/services") == "http://127.0.0.1:8000/api/v1/services"
    assert ep.ws_url("m o") == "ws://127.0.0.1:8000/api-ws/v1/realtime?model=m%20o"
    assert ep.api_key == KEY
    tls = Endpoint.resolve(base_url="https://example.test/prefix", api_key=KEY, env={})
    assert tls.ws_url("m") == "wss://example.test/prefix/api-ws/v1/realtime?model=m"
    # A local server may need no key at all: then no Authorization header is sent.
    anon = Endpoint.resolve(base_url="http://127.0.0.1:9", env={})
    assert "Authorization" not in anon.headers()
    for bad in ("ftp://host", "127.0.0.1:8000", "http://u:p@host", "http://h/?k=v"):
        with pytest.raises(errors.UsageError):
            Endpoint.resolve(base_url=bad, api_key=KEY, env={})


def test_endpoint_without_key_or_base_url_is_a_clear_usage_error() -> None:
    with pytest.raises(errors.UsageError) as info:
        Endpoint.resolve(env={})
    text = str(info.value)
    assert API_KEY_ENV in text and "base_url" in text and "tts-stream serve" in text


def test_endpoint_headers() -> None:
    ep = Endpoint.resolve(api_key=KEY, workspace="ws-42", data_inspection=True, env={})
    h = ep.headers()
    assert h["Authorization"] == f"Bearer {KEY}"
    assert h["X-DashScope-WorkSpace"] == "ws-42"
    assert h["X-DashScope-DataInspection"] == "enable"
    assert h["user-agent"].startswith("tts-stream/") and " python/3." in h["user-agent"]
    plain = Endpoint.resolve(api_key=KEY, env={}).headers()
    assert "X-DashScope-WorkSpace" not in plain and "X-DashScope-DataInspection" not in plain


def test_endpoint_never_shows_the_key() -> None:
    ep = Endpoint.resolve(api_key=KEY, workspace="ws", env={})
    for text in (repr(ep), str(ep), f"{ep}", f"{ep!r}"):
        assert KEY not in text
        assert "sk-***" in text
    assert ep.has_key


# --- RetryPolicy and Retry-After (pure) ----------------------------------------------------------


def test_backoff_full_jitter_is_capped() -> None:
    p = RetryPolicy(attempts=5, base_delay=0.5, max_delay=4.0)
    assert p.delay(0, u=0.0) == 0.0
    assert p.delay(0, u=0.999) == pytest.approx(0.4995)
    assert p.delay(2, u=0.5) == pytest.approx(1.0)  # 0.5 * min(4, 0.5 * 4)
    assert p.delay(10, u=0.999) <= 4.0  # exponential part capped at max_delay
    # Retry-After raises the floor but never beyond max_delay.
    assert p.delay(0, u=0.0, retry_after=1.5) == 1.5
    assert p.delay(0, u=0.0, retry_after=60.0) == 4.0
    with pytest.raises(errors.UsageError):
        RetryPolicy(attempts=0)
    assert NO_RETRY.attempts == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after({}, now=0.0) is None
    assert parse_retry_after({"retry-after": "3"}, now=0.0) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, now=0.0) == 0.25
    assert parse_retry_after({"retry-after": "-4"}, now=0.0) == 0.0
    # HTTP-date form: 2015-10-21 07:28:00 UTC = 1445412480.
    date = {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}
    assert parse_retry_after(date, now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "soon"}, now=0.0) is None


def test_names_and_voice() -> None:
    assert validate_preferred_name("guan_yu_01") == "guan_yu_01"
    for bad in ("", "x" * 17, "with-dash", "空", "a b", None):
        with pytest.raises(errors.UsageError):
            validate_preferred_name(bad)
    v = Voice(name="qwen-tts-vc-a-voice-20250812105009984-838b", target_model=VC_MODELS[0])
    assert str(v) == v.name and f"{v}" == v.name
    assert not v.fallback_mode
    page = Page(voices=(v,))
    assert list(page) == [v] and len(page) == 1


# --- scripted HTTP peer: wire shapes the local server never produces ------------------------
# The local server speaks the documented protocol; these tests need the undocumented corners
# of the real service (§4.1, §9.15: empty bodies on workspace hosts, request id only in a
# header, a 200 without output, a silent peer). A tiny aiohttp.web app replays them.

Reply = tuple[int, bytes, dict[str, str]]


class ScriptedPeer:
    """Answers each POST with the next scripted reply (the last one repeats)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, object]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers)})
        status, raw, headers = self.replies[min(len(self.requests), len(self.replies)) - 1]
        return web.Response(status=status, body=raw, headers=headers)


@contextlib.asynccontextmanager
async def scripted(replies: list[Reply]) -> AsyncIterator[tuple[ScriptedPeer, str]]:
    peer = ScriptedPeer(replies)
    app = web.Application()
    app.router.add_post(ENROLLMENT_PATH, peer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield peer, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def client(
    base_url: str, *, key: str | None = KEY, retry: RetryPolicy = FAST, limit_s: float = 5.0
) -> AsyncIterator[Voices]:
    endpoint = Endpoint.resolve(base_url=base_url, api_key=key, env={})
    async with open_voices(endpoint, retry=retry, timeout=limit_s, create_timeout=limit_s) as v:
        yield v


def ok(output: object, **headers: str) -> Reply:
    return 200, orjson.dumps({"output": output, "usage": {"count": 0}, "request_id": RID}), headers


RID = "00000000-1111-2222-3333-444444444444"


async def test_empty_error_body_uses_status_and_header_request_id() -> None:
    async with scripted([(400, b"", {"x-request-id": RID})]) as (peer, url), client(url) as v:
        with pytest.raises(errors.ServerError) as info:
            await v.delete("qwen-tts-vc-x-voice-20250812105009984-838b")
    err = info.value
    assert type(err) is errors.ServerError
    assert (err.status, err.code, err.request_id, err.retryable) == (400, None, RID, False)
    assert "HTTP 400" in str(err) and RID in str(err)
    assert len(peer.requests) == 1


async def test_non_json_error_body_is_tolerated() -> None:
    replies: list[Reply] = [(502, b"<html>bad gateway</html>", {"content-type": "text/html"})]
    async with scripted(replies) as (peer, url), client(url) as v:
        with pytest.raises(errors.ServerError) as info:
            await v.list()
    assert info.value.status == 502 and info.value.retryable
    assert len(peer.requests) == FAST.attempts  # 5xx on list: retried, then given up


async def test_msg_key_and_header_request_id() -> None:
    body = orjson.dumps({"code": "InvalidParameter", "msg": "page_size too large"})
    async with scripted([(400, body, {"x-request-id": RID})]) as (_, url), client(url) as v:
        with pytest.raises(errors.ServerError) as info:
            await v.list()
    assert info.value.message == "page_size too large"
    assert (info.value.code, info.value.request_id) == ("InvalidParameter", RID)


async def test_success_without_output_is_a_protocol_violation() -> None:
    for raw in (b"", b"not json", orjson.dumps({"usage": {"count": 0}}), b"[1, 2]"):
        async with scripted([(200, raw, {})]) as (peer, url), client(url) as v:
            with pytest.raises(errors.ProtocolViolation):
                await v.list()
            assert len(peer.requests) == 1  # a broken body is not retried


async def test_200_with_error_code_is_an_error() -> None:
    quota = {"code": "Throttling.AllocationQuota", "message": "full", "request_id": RID}
    body = orjson.dumps(quota)
    async with scripted([(200, body, {})]) as (_, url), client(url) as v:
        with pytest.raises(errors.QuotaExceeded) as info:
            await v.list()
    assert info.value.request_id == RID


async def test_old_shapes_are_accepted() -> None:
    old_list = ok({"voice_list": [{"voice": "v1", "gmt_create": "2025-08-11 17:59:32"}]})
    old_delete: Reply = (200, orjson.dumps({"usage": {"count": 0}, "request_id": RID}), {})
    async with scripted([old_list, old_delete]) as (peer, url), client(url) as v:
        page = await v.list(page_size=10)
        assert [x.name for x in page] == ["v1"]
        assert page.voices[0].created == "2025-08-11 17:59:32"
        assert page.voices[0].target_model is None
        assert (page.page_index, page.total_count, page.request_id) == (None, None, RID)
        assert await v.delete(page.voices[0]) is True
    assert peer.requests[1]["body"] == {
        "model": "qwen-voice-enrollment",
        "input": {"action": "delete", "voice": "v1"},
    }
    headers = peer.requests[0]["headers"]
    assert isinstance(headers, dict)
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"].startswith("application/json")


async def test_retry_after_header_is_honoured() -> None:
    throttled: Reply = (429, orjson.dumps({"code": "Throttling"}), {"retry-after-ms": "60"})
    policy = RetryPolicy(attempts=2, base_delay=0.0, max_delay=1.0)
    async with scripted([throttled, ok({"voice_list": []})]) as (peer, url):
        async with client(url, retry=policy) as v:
            t0 = time.monotonic()
            page = await v.list()
            elapsed = time.monotonic() - t0
    assert len(page) == 0 and len(peer.requests) == 2
    assert elapsed >= 0.055  # waited the server's 60 ms although base_delay is 0


async def test_silent_peer_times_out() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # never answers; EOF once the client gives up
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        finally:
            done.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with client(f"http://127.0.0.1:{port}", retry=NO_RETRY, limit_s=0.3) as v:
            with pytest.raises(errors.Timeout) as info:
                await v.list()
        await asyncio.wait_for(done.wait(), 5.0)  # the client closed its side
    assert info.value.seconds == 0.3 and "list" in info.value.what
    assert isinstance(info.value, TimeoutError)


async def test_nothing_listening_is_connection_failed_after_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with client(f"http://127.0.0.1:{free_port()}") as v:
        with pytest.raises(errors.ConnectionFailed) as info:
            await v.list()
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == FAST.attempts - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- create: local checks before any network traffic ----------------------------------------


async def test_sample_rejected_lists_every_violation(tmp_path: Path) -> None:
    # 8 kHz stereo breaks two rules at once; both must be reported in one go.
    pcm = samplegen.speech(12.0, rate=8000)
    stereo = np.repeat(pcm[:, None], 2, axis=1).reshape(-1)
    path = tmp_path / "two_problems.wav"
    path.write_bytes(samplegen.wav_bytes(stereo, 8000, channels=2))
    async with client(f"http://127.0.0.1:{free_port()}") as v:
        with pytest.raises(errors.SampleRejected) as info:
            await v.create(path, preferred_name="bad")
    report = info.value.report
    assert isinstance(report, SampleReport)
    assert {"sample_rate", "channels"} <= report.rules()
    assert "sample" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preferred_name": "no-dashes"}, "preferred_name"),
        ({"preferred_name": "x" * 17}, "preferred_name"),
        ({"preferred_name": "ok", "target_model": "qwen3-tts-flash-realtime"}, "target_model"),
        ({"preferred_name": "ok", "language": "English"}, "language"),
        ({"preferred_name": "ok", "text": "  "}, "text"),
    ],
)
async def test_create_arguments_checked_locally(kwargs: dict[str, str], match: str) -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as v:
        with pytest.raises(errors.UsageError, match=match):
            await v.create(samplegen.good_sample_wav(), **kwargs)  # type: ignore[arg-type]


async def test_unreadable_sample_path_is_a_usage_error(tmp_path: Path) -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as v:
        with pytest.raises(errors.UsageError, match="cannot read"):
            await v.create(tmp_path / "missing.wav", preferred_name="ok")


async def test_create_retries_only_when_nothing_was_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Connection refused: the request provably never left, so create may try again.
    caplog.set_level(logging.WARNING, logger="tts_stream.enrollment")
    async with client(f"http://127.0.0.1:{free_port()}") as v:
        with pytest.raises(errors.ConnectionFailed):
            await v.create(samplegen.good_sample_wav(), preferred_name="ok")
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == FAST.attempts - 1


def exception_texts(exc: BaseException) -> str:
    """Everything a user could see of an exception: str, repr, traceback, the whole chain."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "args", ()))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_a_server_echoing_the_key_cannot_leak_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = orjson.dumps({"code": "InvalidApiKey", "message": f"Invalid API-key provided: {KEY}"})
    async with scripted([(401, echo, {})]) as (_, url), client(url) as v:
        with pytest.raises(errors.AuthenticationError) as info:
            await v.list()
    assert "sk-***" in info.value.message
    assert KEY not in exception_texts(info.value)
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() for r in caplog.records)


# --- loopback: the real client against the real local server ----------------------------------


def voices_for(srv: LocalServer, *, key: str | None = None, retry: RetryPolicy = FAST) -> Any:
    return client(srv.base_url, key=key or srv.api_key, retry=retry, limit_s=TIMEOUT)


async def test_create_list_all_count_delete(server: LocalServer, tmp_path: Path) -> None:
    path = tmp_path / "me.wav"
    path.write_bytes(samplegen.good_sample_wav())
    async with voices_for(server) as v:
        assert await v.count() == 0
        a = await v.create(path, preferred_name="from_path", language="en")
        b = await v.create(
            samplegen.good_sample_mp3(), preferred_name="from_mp3", target_model=VC_MODELS[1]
        )
        assert VOICE_NAME.fullmatch(a.name) and "from_path" in a.name
        assert (a.target_model, a.language, a.fallback_mode) == (VC_MODELS[0], "en", False)
        assert b.target_model == VC_MODELS[1]
        page = await v.list()
        assert [x.name for x in page] == [a.name, b.name]
        assert (page.page_index, page.page_size, page.total_count) == (0, 10, 2)
        assert page.request_id is not None and len(page.request_id) == 36
        listed = {x.name: x for x in page}
        assert listed[a.name].created is not None and listed[a.name].language == "en"
        assert listed[b.name].target_model == VC_MODELS[1]
        assert [x.name async for x in v.all()] == [a.name, b.name]
        assert await v.count() == 2
        assert await v.delete(a) is True
        assert await v.delete(b.name) is True
        assert await v.count() == 0
    assert server.stats().voices_created == 2


async def test_paging_through_more_than_one_page(server: LocalServer) -> None:
    async with voices_for(server) as v:
        made = [
            (await v.create(samplegen.good_sample_wav(), preferred_name=f"p{i}")).name
            for i in range(5)
        ]
        before = server.stats().http_requests
        assert [x.name async for x in v.all(page_size=2)] == made
        assert server.stats().http_requests - before == 3  # 2 + 2 + 1 (short page ends it)
        second = await v.list(page_index=1, page_size=2)
        assert [x.name for x in second] == made[2:4] and second.total_count == 5
        assert len(await v.list(page_index=9, page_size=2)) == 0
        assert await v.count(page_size=2) == 5


async def test_bad_sample_sends_nothing(server: LocalServer) -> None:
    async with voices_for(server) as v:
        for build, rules in samplegen.BAD_SAMPLES.values():
            with pytest.raises(errors.SampleRejected) as info:
                await v.create(build(), preferred_name="bad")
            report = info.value.report
            assert isinstance(report, SampleReport) and rules <= report.rules()
    assert server.stats().http_requests == 0  # a create costs money: nothing was sent


async def test_check_false_lets_the_server_judge(server: LocalServer) -> None:
    async with voices_for(server) as v:
        with pytest.raises(errors.ServerError) as info:
            await v.create(samplegen.low_rate_wav(), preferred_name="lowrate", check=False)
    err = info.value
    assert (err.status, err.code, err.retryable) == (400, "Audio.AudioRateError", False)
    assert err.request_id is not None and err.request_id in str(err)
    assert server.stats().http_requests == 1 and server.stats().voices_created == 0


async def test_url_sample_is_passed_through_unchecked(server: LocalServer) -> None:
    # The service downloads URL samples itself: no local check is possible, the server's
    # verdict comes back (here: the loopback-only local server fetches our tiny file host).
    files = {"/good.wav": samplegen.good_sample_wav(), "/bad.wav": samplegen.stereo_wav()}

    async def serve_file(request: web.Request) -> web.Response:
        return web.Response(body=files[request.path], content_type="audio/wav")

    app = web.Application()
    for name in files:
        app.router.add_get(name, serve_file)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with voices_for(server) as v:
            voice = await v.create(host + "/good.wav", preferred_name="by_url")
            assert voice.name.startswith("qwen-tts-vc-by_url-voice-")
            with pytest.raises(errors.ServerError) as info:
                await v.create(host + "/bad.wav", preferred_name="by_url")
            assert not isinstance(info.value, errors.SampleRejected)
            assert info.value.status == 400 and info.value.code == "Audio.PreprocessError"
    finally:
        await runner.cleanup()


async def test_delete_missing_voice(server: LocalServer) -> None:
    ghost = "qwen-tts-vc-ghost-voice-20250812105009984-838b"
    async with voices_for(server) as v:
        with pytest.raises(errors.VoiceNotFound) as info:
            await v.delete(ghost)
        err = info.value
        assert (err.status, err.code, err.retryable) == (400, "BadRequest.VoiceNotFound", False)
        assert err.request_id is not None and ghost in err.message
        before = server.stats().http_requests
        assert await v.delete(ghost, missing_ok=True) is False
        assert server.stats().http_requests == before + 1  # asked once, not retried


@pytest.mark.parametrize(
    ("status", "code", "cls", "retryable"),
    [
        (401, "InvalidApiKey", errors.AuthenticationError, False),
        (403, "Model.AccessDenied", errors.AuthenticationError, False),
        (403, "Workspace.AccessDenied", errors.AuthenticationError, False),
        (400, "Throttling.AllocationQuota", errors.QuotaExceeded, False),
        (429, "Throttling.RateQuota", errors.RateLimited, True),
        (400, "BadRequest.VoiceNotFound", errors.VoiceNotFound, False),
        (400, "InvalidParameter", errors.ServerError, False),
        (400, "Arrearage", errors.ServerError, False),
        (500, "InternalError", errors.ServerError, True),
        (503, "ServiceUnavailable", errors.ServerError, True),
    ],
)
async def test_errors_map_to_the_tree(
    server: LocalServer, status: int, code: str, cls: type[errors.ServerError], retryable: bool
) -> None:
    server.faults.set(enrollment_error=(status, code), enrollment_error_message="told so")
    async with voices_for(server, retry=NO_RETRY) as v:
        with pytest.raises(errors.ServerError) as info:
            await v.list()
    err = info.value
    assert type(err) is cls
    assert (err.status, err.code, err.retryable) == (status, code, retryable)
    assert err.message == "told so"
    assert err.request_id is not None and len(err.request_id) == 36


@pytest.mark.parametrize(("status", "code"), [(503, "ServiceUnavailable"), (429, "Throttling")])
async def test_list_and_delete_retry_transient_errors(
    server: LocalServer, status: int, code: str
) -> None:
    async with voices_for(server) as v:
        voice = await v.create(samplegen.good_sample_wav(), preferred_name="retry")
        server.faults.set(enrollment_error=(status, code), enrollment_error_times=2)
        before = server.stats().http_requests
        assert [x.name for x in await v.list()] == [voice.name]
        assert server.stats().http_requests - before == 3  # two faults, then success

        server.faults.set(enrollment_error=(status, code), enrollment_error_times=2)
        before = server.stats().http_requests
        assert await v.delete(voice) is True
        assert server.stats().http_requests - before == 3

        server.faults.set(enrollment_error=(status, code), enrollment_error_times=5)
        before = server.stats().http_requests
        with pytest.raises(errors.ServerError) as info:
            await v.list()
        assert info.value.status == status
        assert server.stats().http_requests - before == FAST.attempts  # bounded
    server.faults.reset()


async def test_create_is_not_retried_after_a_server_error(server: LocalServer) -> None:
    async with voices_for(server) as v:
        server.faults.set(enrollment_error=(500, "InternalError"), enrollment_error_times=1)
        with pytest.raises(errors.ServerError) as info:
            await v.create(samplegen.good_sample_wav(), preferred_name="once")
        assert info.value.retryable  # retryable in general, but create never risks a twin
        assert server.stats().http_requests == 1
        assert await v.count() == 0


async def test_create_is_retried_on_429(server: LocalServer) -> None:
    async with voices_for(server) as v:
        server.faults.set(enrollment_error=(429, "Throttling.RateQuota"), enrollment_error_times=1)
        voice = await v.create(samplegen.good_sample_wav(), preferred_name="throttled")
        assert server.stats().http_requests == 2
        assert [x.name async for x in v.all()] == [voice.name]


async def test_quota_exceeded_from_the_server() -> None:
    async with LocalServer(port=0, backend="tone", quota=1) as srv, voices_for(srv) as v:
        await v.create(samplegen.good_sample_wav(), preferred_name="first")
        with pytest.raises(errors.QuotaExceeded) as info:
            await v.create(samplegen.good_sample_wav(), preferred_name="second")
        assert info.value.code == "Throttling.AllocationQuota" and info.value.status == 400
        assert srv.stats().voices_created == 1


async def test_voices_are_per_key(server: LocalServer) -> None:
    other = "sk-other-tenant-0000000000000000"
    server.add_api_key(other)
    async with voices_for(server) as mine, voices_for(server, key=other) as theirs:
        voice = await mine.create(samplegen.good_sample_wav(), preferred_name="mine")
        assert await theirs.count() == 0
        with pytest.raises(errors.VoiceNotFound):
            await theirs.delete(voice)
        assert await mine.count() == 1


async def test_auth_failure_never_leaks_the_key(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, aiohttp's, the server's
    wrong = "sk-wrong-" + "9" * 32
    seen: list[BaseException] = []
    async with voices_for(server, key=wrong) as v:
        attempts = [
            v.list(),
            v.count(),
            v.delete("qwen-tts-vc-x-voice-20250812105009984-838b"),
            v.create(samplegen.good_sample_wav(), preferred_name="nope"),
        ]
        for call in attempts:
            with pytest.raises(errors.AuthenticationError) as info:
                await call
            assert (info.value.status, info.value.code) == (401, "InvalidApiKey")
            seen.append(info.value)
        assert wrong not in repr(v) and wrong not in str(v.endpoint)
    assert server.stats().http_requests == len(attempts)  # 401 is never retried
    texts = "\n".join(exception_texts(e) for e in seen)
    logs = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    for secret in (wrong, server.api_key):
        assert secret not in texts
        assert secret not in logs
    assert any(r.name.startswith("tts_stream.enrollment") for r in caplog.records)


async def test_delete_retry_that_finds_the_voice_gone_succeeded() -> None:
    # A 503 may have come after the voice was deleted (§4.4): the retry's VoiceNotFound
    # then means "done". After a 429 (not processed) it still means "never existed".
    gone = orjson.dumps({"code": "BadRequest.VoiceNotFound", "message": "Voice 'v' not found."})
    unavailable: Reply = (503, orjson.dumps({"code": "ServiceUnavailable"}), {})
    throttled: Reply = (429, orjson.dumps({"code": "Throttling"}), {})
    async with scripted([unavailable, (400, gone, {})]) as (peer, url), client(url) as v:
        assert await v.delete("v") is True
        assert len(peer.requests) == 2
    async with scripted([throttled, (400, gone, {})]) as (peer, url), client(url) as v:
        with pytest.raises(errors.VoiceNotFound):
            await v.delete("v")
        assert len(peer.requests) == 2


async def test_count_pages_through_when_total_count_is_absent() -> None:
    def old_page(*names: str) -> Reply:
        return ok({"voice_list": [{"voice": n} for n in names]})

    async with scripted([old_page("a", "b"), old_page("c")]) as (peer, url), client(url) as v:
        assert await v.count(page_size=2) == 3
    assert [r["body"]["input"]["page_index"] for r in peer.requests] == [0, 1]  # type: ignore[index]
