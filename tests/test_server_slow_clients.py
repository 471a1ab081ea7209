"""The local server does not trust slow or broken HTTP clients (issue 9.6).

Real clients on raw asyncio sockets over loopback: half a header is cut at the header
timeout, half a body gets a JSON 408 at the body timeout, a client that leaves mid-body
costs one rate-limited INFO line (no traceback), an undecodable ``Content-Encoding`` is a
JSON 400 ``BadRequest.IllegalInput``, connections beyond the cap wait in the listen backlog,
and running out of file descriptors neither spins nor floods the log. Malformed requests
never take the server down: it answers an honest request afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys

import aiohttp
import orjson
import pytest

from tests.conftest import TIMEOUT
from tts_stream.messages import ENROLLMENT_PATH
from tts_stream.server import LocalServer
from tts_stream.testing.hostile import raw_request

LIST = b'{"model":"qwen-voice-enrollment","input":{"action":"list"}}'


async def open_raw(srv: LocalServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", srv.port)


async def list_ok(srv: LocalServer) -> None:
    """An honest request is still answered."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(srv.base_url + ENROLLMENT_PATH, data=LIST,
                  headers={"Authorization": f"Bearer {srv.api_key}"}) as resp,
    ):  # fmt: skip
        assert resp.status == 200


def split_answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


def errors_and_tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_half_a_header_is_cut_at_the_header_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with LocalServer(port=0, header_timeout_s=0.5) as srv:
        conns = [await open_raw(srv) for _ in range(20)]
        for _, writer in conns:
            writer.write(b"POST " + ENROLLMENT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        for reader, _ in conns:  # the server closes each one (EOF), bounded wait
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        for _, writer in conns:
            writer.close()
        await list_ok(srv)
    assert not errors_and_tracebacks(caplog)


async def test_half_a_body_gets_a_json_408(caplog: pytest.LogCaptureFixture) -> None:
    async with LocalServer(port=0, body_timeout_s=0.5) as srv:
        conns = [await open_raw(srv) for _ in range(10)]
        for _, writer in conns:
            writer.write(raw_request(ENROLLMENT_PATH, b'{"model"', api_key=srv.api_key,
                                     length=len(LIST)))  # fmt: skip
        for reader, writer in conns:
            status, answer = split_answer(await asyncio.wait_for(reader.read(), TIMEOUT))
            assert (status, answer["code"]) == (408, "RequestTimeout")
            assert "8 bytes received" in str(answer["message"])
            writer.close()
        await list_ok(srv)
    assert not errors_and_tracebacks(caplog)


async def test_clients_leaving_mid_body_cost_one_quiet_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with LocalServer(port=0) as srv:
        for _ in range(20):
            reader, writer = await open_raw(srv)
            writer.write(raw_request(ENROLLMENT_PATH, b'{"mo', api_key=srv.api_key, length=900))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.3)  # let the server see the disconnects
        await list_ok(srv)
    assert not errors_and_tracebacks(caplog)
    left = [r for r in caplog.records if "left before its request was read" in r.getMessage()]
    assert 1 <= len(left) <= 2, [r.getMessage() for r in left]  # rate-limited


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_undecodable_content_encoding_is_a_json_400(
    encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with LocalServer(port=0) as srv:
        reader, writer = await open_raw(srv)
        writer.write(raw_request(ENROLLMENT_PATH, LIST, api_key=srv.api_key,
                                 headers={"Content-Encoding": encoding}))  # fmt: skip
        status, answer = split_answer(await asyncio.wait_for(reader.read(), TIMEOUT))
        writer.close()
        assert (status, answer["code"]) == (400, "BadRequest.IllegalInput")
        assert set(answer) == {"request_id", "code", "message"}
        assert encoding in str(answer["message"])
        await list_ok(srv)
    assert not errors_and_tracebacks(caplog)


async def test_malformed_requests_never_take_the_server_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    garbage = [
        b"POST / HTTP/1.1\r\n\r\n",  # no Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello
        b"GET /api-ws/v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",  # no key
        b"POST " + ENROLLMENT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST " + ENROLLMENT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"X" * 70_000 + b"\r\n\r\n",  # request line too long
    ]
    async with LocalServer(port=0, header_timeout_s=1.0) as srv:  # a TLS hello has no CRLF
        for data in garbage * 3:
            reader, writer = await open_raw(srv)
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
        await list_ok(srv)
    assert not errors_and_tracebacks(caplog)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 3


async def test_connections_beyond_the_cap_wait_in_the_backlog() -> None:
    async with LocalServer(port=0, max_connections=5) as srv:
        assert srv.max_connections == 5
        idle = [await open_raw(srv) for _ in range(5)]
        await asyncio.sleep(0.2)
        reader, writer = await open_raw(srv)  # the kernel completes it; we do not accept
        writer.write(raw_request(ENROLLMENT_PATH, LIST, api_key=srv.api_key,
                                 headers={"Connection": "close"}))  # fmt: skip
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
        idle[0][1].close()  # one slot frees: the waiting client is served
        status, _ = split_answer(await asyncio.wait_for(reader.read(), TIMEOUT))
        assert status == 200
        writer.close()
        for _, w in idle[1:]:
            w.close()


def test_cap_follows_the_open_files_limit() -> None:
    from tts_stream.server.listener import FD_RESERVE, connection_cap

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(10**9) == soft - FD_RESERVE
    assert connection_cap(3) == 3


_CLIENTS = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    socks.append(s)
time.sleep(float(sys.argv[3]))
"""


async def test_out_of_descriptors_neither_spins_nor_floods_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # This process (the server) runs out of descriptors; a child process (its own
    # descriptor table) opens 40 connections meanwhile. asyncio's own accept loop logged
    # thousands of errors a second here; the server's accept loop logs one and pauses.
    async with LocalServer(port=0) as srv:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hog: list[int] = []
        clients = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENTS, str(srv.port), "40", "3"
        )
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            with contextlib.suppress(OSError):
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            await asyncio.sleep(2.0)
        finally:
            for fd in hog:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await asyncio.wait_for(clients.wait(), TIMEOUT)
        await list_ok(srv)
    flood = [r for r in caplog.records if r.name == "asyncio"]
    assert not flood, f"{len(flood)} asyncio records: {flood[0].getMessage()}"
    accept_errors = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert 1 <= len(accept_errors) <= 2, len(accept_errors)
