"""The local server's enrollment API over real loopback HTTP (protocol.md §4).

Plain aiohttp requests (the enrollment client is tested elsewhere): envelope, every error of
§4.9 with its HTTP status, naming, paging, quota under concurrency, tenant isolation,
persistence across a restart and the retention purge.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pybase64
import pytest
from aiohttp import web
from websockets.asyncio.client import connect

from tests.conftest import Enroll
from tts_stream.messages import (
    ENROLLMENT_MODEL,
    ENROLLMENT_PATH,
    VC_MODELS,
    create_voice_request,
    delete_voice_request,
    list_voices_request,
    parse_created_voice,
    parse_voice_page,
)
from tts_stream.samples import data_uri, inspect_sample, measure_pitch
from tts_stream.server import LocalServer
from tts_stream.testing import samplegen

TIMEOUT = 20.0
NAME_RE = re.compile(r"^qwen-tts-vc-(?P<pref>[A-Za-z0-9_]{1,16})-voice-(?P<ts>\d{17})-[0-9a-f]{4}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def post(
    srv: LocalServer,
    body: Any,
    *,
    api_key: str | None = None,
    raw: bytes | None = None,
    auth: bool = True,
) -> tuple[int, dict[str, Any]]:
    """POST to the enrollment endpoint; checks the request-id envelope on every answer."""
    headers = {"Content-Type": "application/json; charset=utf-8", "X-Unknown-Header": "ignored"}
    if auth:
        headers["Authorization"] = f"Bearer {api_key or srv.api_key}"
    data = raw if raw is not None else orjson.dumps(body)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(srv.base_url + ENROLLMENT_PATH, data=io.BytesIO(data), headers=headers) as resp,
    ):
        answer = orjson.loads(await resp.read())
        assert isinstance(answer, dict)
        assert UUID_RE.match(answer["request_id"])
        assert resp.headers["x-request-id"] == answer["request_id"]
        if resp.status != 200:
            assert set(answer) == {"request_id", "code", "message"}, answer
        return resp.status, answer


def create_body(
    wav: bytes | None = None, *, mime: str = "audio/wav", **fields: Any
) -> dict[str, Any]:
    body = create_voice_request(
        target_model=fields.pop("target_model", VC_MODELS[0]),
        preferred_name=fields.pop("preferred_name", "guanyu"),
        audio_data=data_uri(wav if wav is not None else samplegen.good_sample_wav(), mime),
        **fields,
    )
    return body


async def expect_error(srv: LocalServer, body: Any, status: int, code: str, **kw: Any) -> str:
    got, answer = await post(srv, body, **kw)
    assert (got, answer["code"]) == (status, code), answer
    assert isinstance(answer["message"], str) and answer["message"]
    return str(answer["message"])


class Clock:
    """An injectable wall clock (epoch seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- happy paths ---------------------------------------------------------------------------------


async def test_create_answers_the_documented_shape() -> None:
    clock = Clock(1_768_444_200.123)  # 2026-01-15 02:30:00.123 UTC
    async with LocalServer(clock=clock) as srv:
        body = create_body(text="Hello, I am recording.", language="en")
        body["parameters"] = {}  # the 1.x SDK adds it: ignored
        status, answer = await post(srv, body)
    assert status == 200
    assert answer["usage"] == {"count": 1}
    out = answer["output"]
    assert out["target_model"] == VC_MODELS[0] and out["fallback_mode"] is False
    m = NAME_RE.match(out["voice"])
    assert m and m["pref"] == "guanyu" and m["ts"] == "20260115023000123"
    assert parse_created_voice(answer).voice == out["voice"]


@pytest.mark.parametrize(
    ("builder", "mime"),
    [(samplegen.good_sample_mp3, "audio/mpeg"), (samplegen.good_sample_m4a, "audio/mp4")],
)
async def test_create_accepts_mp3_and_m4a(
    server: LocalServer, builder: Callable[[], bytes], mime: str
) -> None:
    status, answer = await post(server, create_body(builder(), mime=mime, preferred_name="a_1"))
    assert status == 200 and NAME_RE.match(answer["output"]["voice"])


async def test_list_pages_in_creation_order_and_delete(server: LocalServer, enroll: Enroll) -> None:
    names = [
        await enroll(server, preferred_name=f"v{i}", language="en" if i else None) for i in range(3)
    ]
    status, answer = await post(server, {"model": ENROLLMENT_MODEL, "input": {"action": "list"}})
    assert status == 200 and answer["usage"] == {"count": 0}
    out = answer["output"]
    assert (out["page_index"], out["page_size"], out["total_count"]) == (0, 10, 3)
    assert [v["voice"] for v in out["voice_list"]] == names
    first = out["voice_list"][0]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", first["gmt_create"])
    assert first["gmt_modified"] == first["gmt_create"] and first["target_model"] == VC_MODELS[0]
    assert "language" not in first and out["voice_list"][1]["language"] == "en"
    pages = []
    for index in range(3):
        status, answer = await post(server, list_voices_request(page_index=index, page_size=2))
        page = parse_voice_page(answer)
        assert page.total_count == 3 and page.page_size == 2 and page.page_index == index
        pages.append([v.voice for v in page.voices])
    assert pages == [names[:2], names[2:], []]
    status, answer = await post(server, list_voices_request(page_size=0))
    assert status == 200 and answer["output"]["voice_list"] == []

    status, answer = await post(server, delete_voice_request(names[1]))
    assert status == 200 and answer == {
        "output": {"voice": names[1]},
        "usage": {"count": 0},
        "request_id": answer["request_id"],
    }
    message = await expect_error(
        server, delete_voice_request(names[1]), 400, "BadRequest.VoiceNotFound"
    )
    assert message == f"Voice '{names[1]}' not found."
    _, answer = await post(server, list_voices_request())
    assert [v["voice"] for v in answer["output"]["voice_list"]] == [names[0], names[2]]


async def test_stored_pitch_drives_the_synthesizer(server: LocalServer, enroll: Enroll) -> None:
    """The speaker's F0 measured at enrollment reaches the synthesizer (tone backend: f0)."""
    low, high = samplegen.good_sample_wav(pitch=10), samplegen.good_sample_wav(pitch=90)
    for wav in (low, high):
        expected = inspect_sample(wav).pitch_hz
        assert expected is not None
        name = await enroll(server, wav=wav)
        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with asyncio.timeout(TIMEOUT):
            async with connect(
                f"{server.ws_url}?model={VC_MODELS[0]}", additional_headers=headers
            ) as ws:
                await ws.send(
                    orjson.dumps(
                        {"type": "session.update", "session": {"voice": name, "mode": "commit"}}
                    ).decode()
                )
                await ws.send(
                    orjson.dumps({"type": "input_text_buffer.append", "text": "x" * 30}).decode()
                )
                await ws.send(orjson.dumps({"type": "session.finish"}).decode())
                pcm = b""
                async for frame in ws:
                    event = orjson.loads(frame)
                    if event["type"] == "response.audio.delta":
                        pcm += pybase64.b64decode(event["delta"])
        f0 = measure_pitch(np.frombuffer(pcm, "<i2"), 24000)
        assert f0 is not None and abs(f0 - expected) < 0.1 * expected


# --- the error catalogue of §4.9 -----------------------------------------------------------------


async def test_authentication_errors(server: LocalServer) -> None:
    body = list_voices_request()
    await expect_error(server, body, 401, "InvalidApiKey", auth=False)
    await expect_error(server, body, 401, "InvalidApiKey", api_key="sk-wrong")


async def test_envelope_errors(server: LocalServer) -> None:
    await expect_error(server, None, 400, "BadRequest.IllegalInput", raw=b"{not json")
    await expect_error(server, [1, 2], 400, "BadRequest.IllegalInput")
    await expect_error(server, {"input": {"action": "list"}}, 400, "BadRequest.EmptyModel")
    await expect_error(
        server, {"model": "", "input": {"action": "list"}}, 400, "BadRequest.EmptyModel"
    )
    message = await expect_error(
        server, {"model": "voice-enrollment", "input": {}}, 400, "InvalidParameter"
    )
    assert message == "Model not exist."
    await expect_error(server, {"model": ENROLLMENT_MODEL}, 400, "BadRequest.EmptyInput")
    await expect_error(server, {"model": ENROLLMENT_MODEL, "input": "x"}, 400, "InvalidParameter")
    for action in (None, "query", "create_voice"):
        await expect_error(
            server,
            {"model": ENROLLMENT_MODEL, "input": {"action": action}},
            400,
            "InvalidParameter",
        )


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"target_model": "qwen3-tts-flash-realtime"}, "target_model"),
        ({"target_model": None}, "target_model"),
        ({"preferred_name": "has-hyphen"}, "preferred_name"),
        ({"preferred_name": "x" * 17}, "preferred_name"),
        ({"preferred_name": ""}, "preferred_name"),
        ({"audio": None}, "audio.data"),
        ({"audio": {"data": ""}}, "audio.data"),
        ({"audio": {"data": "data:audio/ogg;base64,AAAA"}}, "audio.data"),
        ({"audio": {"data": "data:audio/wav;base64,***"}}, "audio.data"),
        ({"audio": {"data": "data:audio/wav,plain"}}, "audio.data"),
        ({"audio": {"data": "ftp://127.0.0.1/a.wav"}}, "audio.data"),
        ({"audio": {"data": "oss://bucket/a.wav"}}, "audio.data"),
        ({"language": "xx"}, "language"),
        ({"text": 5}, "text"),
    ],
)
async def test_create_invalid_parameters(
    server: LocalServer, change: dict[str, Any], what: str
) -> None:
    body = create_body()
    body["input"].update(change)
    message = await expect_error(server, body, 400, "InvalidParameter")
    assert f"({what})" in message


@pytest.mark.parametrize(
    "change",
    [{"page_index": -1}, {"page_size": 1_000_001}, {"page_size": "10"}, {"page_index": True}],
)
async def test_list_invalid_parameters(server: LocalServer, change: dict[str, Any]) -> None:
    body = list_voices_request()
    body["input"].update(change)
    await expect_error(server, body, 400, "InvalidParameter")


async def test_delete_invalid_parameters(server: LocalServer) -> None:
    body = delete_voice_request("x")
    del body["input"]["voice"]
    await expect_error(server, body, 400, "InvalidParameter")


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("garbage", "Audio.DecoderError"),
        ("8bit", "Audio.DecoderError"),
        ("16khz", "Audio.AudioRateError"),
        ("70s", "Audio.DurationLimitError"),
        ("stereo", "Audio.PreprocessError"),
        ("silence", "Audio.PreprocessError"),
        ("short_speech", "Audio.PreprocessError"),
        ("long_pauses", "Audio.PreprocessError"),
        ("oversize", "BadRequest.InputDownloadFailed"),
    ],
)
async def test_sample_checks_map_to_audio_errors(server: LocalServer, case: str, code: str) -> None:
    builder, _rules = samplegen.BAD_SAMPLES[case]
    await expect_error(server, create_body(builder()), 400, code)
    assert server.stats().voices_created == 0


async def test_non_loopback_urls_are_never_fetched(server: LocalServer) -> None:
    for url in ("http://example.invalid/voice.wav", "https://dashscope.example.invalid/a.mp3"):
        body = create_body()
        body["input"]["audio"] = {"data": url}
        message = await expect_error(server, body, 400, "BadRequest.InputDownloadFailed")
        assert "loopback" in message and "did not fetch" in message


@pytest.fixture
async def files() -> AsyncIterator[str]:
    """A loopback HTTP server with /good.wav, /big.bin (11 MB), /redirect and 404s."""
    good = samplegen.good_sample_wav()

    async def good_wav(_: web.Request) -> web.Response:
        return web.Response(body=good, content_type="audio/wav")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=bytes(11 * 1024 * 1024))

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/good.wav")

    app = web.Application()
    app.router.add_get("/good.wav", good_wav)
    app.router.add_get("/big.bin", big)
    app.router.add_get("/redirect", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_loopback_urls_are_fetched_with_limits(server: LocalServer, files: str) -> None:
    for url in (f"{files}/good.wav", files.replace("127.0.0.1", "localhost") + "/good.wav"):
        body = create_body()
        body["input"]["audio"] = {"data": url}
        status, answer = await post(server, body)
        assert status == 200, answer
    for path in ("/missing.wav", "/redirect", "/big.bin"):
        body = create_body()
        body["input"]["audio"] = {"data": files + path}
        await expect_error(server, body, 400, "BadRequest.InputDownloadFailed")


async def test_enrollment_error_fault(server: LocalServer) -> None:
    server.faults.enrollment_error = (503, "ServiceUnavailable")
    await expect_error(server, list_voices_request(), 503, "ServiceUnavailable")
    status, _ = await post(server, list_voices_request())  # only the next call
    assert status == 200
    server.faults.set(enrollment_error=(500, "InternalError"), enrollment_error_times=2)
    await expect_error(server, create_body(), 500, "InternalError")
    await expect_error(server, create_body(), 500, "InternalError")
    assert (await post(server, create_body()))[0] == 200
    assert server.stats().http_requests == 5 and server.stats().voices_created == 1


# --- quota, tenants, persistence, retention ------------------------------------------------------


async def test_quota_is_exact_under_concurrent_creates() -> None:
    async with LocalServer(quota=5) as srv:
        results = await asyncio.gather(
            *(post(srv, create_body(preferred_name=f"q{i}")) for i in range(20))
        )
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 5
        refused = [a for s, a in results if s != 200]
        assert len(refused) == 15
        assert {(a["code"], a["message"]) for a in refused} == {
            (
                "Throttling.AllocationQuota",
                "Maximum voice storage limit exceeded, please delete existing voices.",
            )
        }
        _, answer = await post(srv, list_voices_request())
        assert answer["output"]["total_count"] == 5
        victim = answer["output"]["voice_list"][0]["voice"]
        assert (await post(srv, delete_voice_request(victim)))[0] == 200
        assert (await post(srv, create_body()))[0] == 200  # a slot was freed
        # The quota is per key: another tenant starts at zero.
        srv.add_api_key("sk-tenant-b")
        assert (await post(srv, create_body(), api_key="sk-tenant-b"))[0] == 200


async def test_tenant_isolation(server: LocalServer, voice: str) -> None:
    server.add_api_key("sk-tenant-b")
    _, answer = await post(server, list_voices_request(), api_key="sk-tenant-b")
    assert answer["output"]["voice_list"] == [] and answer["output"]["total_count"] == 0
    await expect_error(
        server, delete_voice_request(voice), 400, "BadRequest.VoiceNotFound", api_key="sk-tenant-b"
    )
    _, answer = await post(server, list_voices_request())
    assert [v["voice"] for v in answer["output"]["voice_list"]] == [voice]


async def test_voices_survive_a_restart_and_keys_are_not_stored(
    tmp_path: Path, enroll: Enroll
) -> None:
    key = "sk-persistent-key-0123456789"
    async with LocalServer(data_dir=tmp_path, api_key=key) as srv:
        name = await enroll(srv)
    async with LocalServer(data_dir=tmp_path, api_key=key) as srv:
        _, answer = await post(srv, list_voices_request())
        assert [v["voice"] for v in answer["output"]["voice_list"]] == [name]
        async with asyncio.timeout(TIMEOUT):
            async with connect(
                f"{srv.ws_url}?model={VC_MODELS[0]}",
                additional_headers={"Authorization": f"Bearer {key}"},
            ) as ws:
                await ws.recv()
                await ws.send(
                    orjson.dumps({"type": "session.update", "session": {"voice": name}}).decode()
                )
                assert orjson.loads(await ws.recv())["type"] == "session.updated"
    stored = await asyncio.to_thread(_read_files, tmp_path)
    assert stored and not any(key.encode() in data for data in stored)


def _read_files(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in directory.iterdir() if p.is_file()]


async def test_retention_purges_unused_voices(enroll: Enroll) -> None:
    day = 86400.0
    clock = Clock(time.time())
    async with LocalServer(clock=clock, retention_days=365) as srv:
        stale = await enroll(srv, preferred_name="stale")
        used = await enroll(srv, preferred_name="used")
        clock.now += 200 * day
        headers = {"Authorization": f"Bearer {srv.api_key}"}
        async with asyncio.timeout(TIMEOUT):
            async with connect(
                f"{srv.ws_url}?model={VC_MODELS[0]}", additional_headers=headers
            ) as ws:
                for event in (
                    {"type": "session.update", "session": {"voice": used}},
                    {"type": "input_text_buffer.append", "text": "Hi."},
                    {"type": "session.finish"},
                ):
                    await ws.send(orjson.dumps(event).decode())
                async for _ in ws:  # a synthesis used the voice: its retention clock restarts
                    pass
        clock.now += 200 * day  # stale: 400 days unused; used: 200 days
        _, answer = await post(srv, list_voices_request())
        assert [v["voice"] for v in answer["output"]["voice_list"]] == [used]
        await expect_error(srv, delete_voice_request(stale), 400, "BadRequest.VoiceNotFound")
        clock.now += 200 * day
        assert srv.purge_expired() == 1


async def test_run_serve_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The CLI entry point in a real subprocess: URL on stdout, key in a file, clean SIGTERM."""
    import os
    import signal
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    code = (
        "import sys; from tts_stream.server import run_serve; "
        f"sys.exit(run_serve(port=0, backend='tone', data_dir={str(tmp_path)!r}))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            base_url = (await proc.stdout.readline()).decode().strip()
            key_line = (await proc.stdout.readline()).decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
        key_file = tmp_path / "api_key"
        assert key_line == f"api key in {key_file}"
        key = (await asyncio.to_thread(key_file.read_text)).strip()
        assert key.startswith("sk-local-") and key not in key_line
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(
                base_url + ENROLLMENT_PATH,
                json=list_voices_request(),
                headers={"Authorization": f"Bearer {key}"},
            ) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
