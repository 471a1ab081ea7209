"""Hostile clone samples cost the server (and the client-side check) almost nothing (issue 9.5).

A header that claims an absurd rate or a duration over the limit is refused before any
decoding (the report has no ``codec``: nothing was decoded); analysis memory is bounded
whatever the file says; the local server inspects at most ``max_inspections`` samples at once
in its own worker threads, and reads large bodies ``max_uploads`` at a time. Figures (memory
per upload, CPU per absurd file, honest latency under attack): ``bench/server_abuse.py``.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import TIMEOUT
from tts_stream.messages import ENROLLMENT_PATH, VC_MODELS, create_voice_request
from tts_stream.samples import (
    ERROR_CODES,
    MAX_SAMPLE_RATE,
    data_uri,
    error_code,
    inspect_sample,
)
from tts_stream.server import LocalServer
from tts_stream.testing import hostile, samplegen


async def create(srv: LocalServer, sample: bytes, mime: str = "audio/wav") -> tuple[int, Any]:
    body = create_voice_request(
        target_model=VC_MODELS[0], preferred_name="probe", audio_data=data_uri(sample, mime)
    )
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(srv.base_url + ENROLLMENT_PATH, data=io.BytesIO(orjson.dumps(body)),
                  headers={"Authorization": f"Bearer {srv.api_key}"}) as resp,
    ):  # fmt: skip
        return resp.status, orjson.loads(await resp.read())


def test_absurd_rate_is_refused_from_the_header() -> None:
    report = inspect_sample(hostile.absurd_rate_wav())
    assert report.rules() == {"sample_rate"}
    assert report.problems[0].measured == 0xFFFFFFFF
    assert report.problems[0].limit == MAX_SAMPLE_RATE
    assert report.codec is None  # never decoded
    assert error_code(report) == ERROR_CODES["sample_rate"]


def test_two_hour_mp3_is_refused_from_the_container() -> None:
    report = inspect_sample(hostile.long_mp3())
    assert report.rules() == {"duration"}
    assert report.duration_s is not None and report.duration_s > 7000
    assert report.codec is None and report.speech_s is None  # never decoded


def test_analysis_memory_is_bounded() -> None:
    # A sample just under the limit: the periodicity analysis runs in blocks, so the traced
    # peak stays far below what whole-file FFTs took (about 150 MB for 59 s).
    data = samplegen.good_sample_wav(59.0)
    inspect_sample(samplegen.good_sample_wav(3.0))  # first-use allocations (FFT plans...)
    tracemalloc.start()
    try:
        report = inspect_sample(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok, report.problems
    assert peak < 48 * 1024 * 1024, peak


async def test_server_answers_hostile_samples_with_the_documented_codes(
    server: LocalServer,
) -> None:
    status, answer = await create(server, hostile.absurd_rate_wav())
    assert (status, answer["code"]) == (400, "Audio.AudioRateError")
    assert "4294967295 Hz" in answer["message"]
    status, answer = await create(server, hostile.long_mp3(), "audio/mpeg")
    assert (status, answer["code"]) == (400, "Audio.DurationLimitError")


async def test_inspections_run_in_a_bounded_pool() -> None:
    seen: set[str] = set()
    most = 0
    stop = threading.Event()

    def watch() -> None:  # samples the live inspection threads while the creates run
        nonlocal most
        while not stop.wait(0.002):
            names = [t.name for t in threading.enumerate() if t.name.startswith("tts-stream-insp")]
            seen.update(names)
            most = max(most, len(names))

    async with LocalServer(port=0, max_inspections=2) as srv:
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            samples = [samplegen.good_sample_wav(12.0 + i % 3) for i in range(8)]
            answers = await asyncio.gather(*(create(srv, s) for s in samples))
        finally:
            stop.set()
            watcher.join(5.0)
    assert [status for status, _ in answers] == [200] * 8
    assert 1 <= most <= 2 and len(seen) <= 2, seen


async def _slow_upload(port: int, api_key: str) -> tuple[asyncio.StreamReader, Any]:
    """A client that announces a 5 MB body and sends only its first bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = hostile.raw_request(ENROLLMENT_PATH, api_key=api_key, length=5_000_000)
    writer.write(head + b'{"model": "qwen-voice-enrollment", "input": {')
    await writer.drain()
    return reader, writer


async def test_large_uploads_take_turns_and_small_requests_pass() -> None:
    # Two slow clients queue for the only large-upload turn (each announces 5 MB and sends a
    # few bytes); an honest large upload queued behind them is told the server is busy, a
    # list request (small body) is answered at once, and each slow client gets its 408.
    async with LocalServer(port=0, max_uploads=1, body_timeout_s=1.5) as srv:
        slow = [await _slow_upload(srv.port, srv.api_key)]
        await asyncio.sleep(0.1)
        slow.append(await _slow_upload(srv.port, srv.api_key))
        await asyncio.sleep(0.1)
        try:
            timeout = aiohttp.ClientTimeout(total=TIMEOUT)
            auth = {"Authorization": f"Bearer {srv.api_key}"}
            big = create_voice_request(
                target_model=VC_MODELS[0], preferred_name="big",
                audio_data=data_uri(samplegen.good_sample_wav(40.0), "audio/wav"),
            )  # fmt: skip
            listing = {"model": "qwen-voice-enrollment",
                       "input": {"action": "list", "page_index": 0, "page_size": 10}}  # fmt: skip
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def post(body: Any) -> tuple[int, Any]:
                    async with http.post(srv.base_url + ENROLLMENT_PATH, headers=auth,
                                         data=io.BytesIO(orjson.dumps(body))) as resp:  # fmt: skip
                        return resp.status, await resp.json()

                big_task = asyncio.create_task(post(big))
                status, _ = await post(listing)
                assert status == 200 and not big_task.done()
                status, answer = await big_task
                assert (status, answer["code"]) == (503, "ServiceUnavailable"), answer
            for reader, _ in slow:
                answer_bytes = await asyncio.wait_for(reader.read(), TIMEOUT)
                assert answer_bytes.startswith(b"HTTP/1.1 408"), answer_bytes[:200]
                assert b'"code":"RequestTimeout"' in answer_bytes
        finally:
            for _, writer in slow:
                writer.close()


@pytest.mark.parametrize("rate", [MAX_SAMPLE_RATE + 1, 10**9])
def test_rates_over_the_maximum_are_problems(rate: int) -> None:
    report = inspect_sample(hostile.absurd_rate_wav(48_000, rate))
    assert report.rules() == {"sample_rate"} and report.sample_rate == rate


def test_bench_script_runs(tmp_path: Path) -> None:
    """``bench/server_abuse.py`` end to end in a tiny configuration (so it never rots)."""
    out = tmp_path / "abuse.jsonl"
    argv = ["--repeat", "1", "--flood", "2", "--slow", "4", "--slow-wait", "0.2", "--out"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.server_abuse", *argv, str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["kind"] == "env" and records[-1]["kind"] == "summary"
    summary = records[-1]
    assert summary["mp3_2h"]["codes"] == ["Audio.DurationLimitError"]
    assert summary["absurd_rate"]["codes"] == ["Audio.AudioRateError"]
    assert summary["slow"]["connections"] == 4
