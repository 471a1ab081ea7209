"""Speech behaviour over loopback: barge-in, back-pressure, first-clause commit, finishing.

Everything runs against the real LocalServer (tone backend, burst pacing) with real sinks.
Slowness of a consumer is simulated by the consumer itself; synchronisation never relies on
sleeps (waits are on data: blocks read from an ArraySink, server counters, queue stats).
"""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks import ArraySink
from tests.conftest import Enroll
from tts_stream import (
    ClosedError,
    Engine,
    ServerError,
    SpeechOptions,
    Timeout,
    UsageError,
    Voice,
)
from tts_stream.messages import VC_MODELS, billable_characters
from tts_stream.server import LocalServer
from tts_stream.speech import chars_for_billable

TIMEOUT = 30.0
MODEL = VC_MODELS[0]
SENTENCES = ["Hello there.", " This is the second sentence.", " And a third one follows."]


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> Voice:
    return Voice(await enroll(server), MODEL)


@pytest.fixture
async def engine(server: LocalServer) -> AsyncIterator[Engine]:
    async with (
        asyncio.timeout(TIMEOUT),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0) as eng,
    ):
        yield eng


async def reference(engine: Engine, voice: Voice, text: str, **kw: Any) -> np.ndarray:
    arr = ArraySink(max_blocks=100_000)
    await engine.say(voice, text, sinks=[arr], **kw)
    return await arr.read_all(within=TIMEOUT)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab 你好,。", max_size=30), st.data())
def test_chars_for_billable_inverts_the_billing_rule(text: str, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(text)))
    assert chars_for_billable(text, billable_characters(text[:k])) == k


def test_chars_for_billable_counts_han_twice() -> None:
    assert chars_for_billable("Hello", 3) == 3
    assert chars_for_billable("你好ab", 4) == 2
    assert chars_for_billable("你好ab", 5) == 3
    assert chars_for_billable("ab", 10) == 2


async def test_interrupt_reports_played_audio_and_drops_late_deltas(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    after_text = "New turn."
    expected_after = await reference(engine, voice, after_text)
    arr = ArraySink(max_blocks=4)  # nobody reads beyond 5 blocks: the pipeline fills up
    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr]) as speech:
            for s in SENTENCES:
                await speech.push(s)
            taken = [await arr.get() for _ in range(5)]
            t0 = time.monotonic()
            report = await speech.interrupt()
            assert time.monotonic() - t0 < 1.5  # generous: the socket backlog is not awaited
            assert arr.queued_blocks == 0  # every sink stopped at once
            played = sum(b.size for b in taken if b is not None)
            assert report.played_ms == {arr.name: pytest.approx(played / 24.0)}
            full = "".join(SENTENCES)
            assert report.spoken_text + report.unspoken_text == full
            assert len(report.spoken_text) < len(SENTENCES[0])  # ~500 ms of a 720 ms clause
            assert full.startswith(report.spoken_text)
            # barge-in, then the conversation goes on: a new session, only new audio
            await speech.push(after_text)
            after: list[np.ndarray] = []
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(_read_until(arr, expected_after.size, after))
                await reader
        m = speech.metrics
    assert m.interrupted
    got = np.concatenate(after)
    assert np.array_equal(got, expected_after)  # no late delta of the old response leaked
    assert await arr.get() is None  # closed, nothing more


async def _read_until(arr: ArraySink, n: int, out: list[np.ndarray]) -> None:
    total = 0
    while total < n:
        block = await arr.get()
        assert block is not None
        out.append(block)
        total += block.size


async def test_push_back_pressure_bounds_memory_with_one_megabyte_of_text(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    text = ("All work and no play makes a dull voice, every day. " * 20_000)[:1_000_000]
    opts = SpeechOptions(max_pending_chars=1000, max_unplayed_ms=1000)
    arr = ArraySink(max_blocks=8)
    pushed = 0
    consumed = 0
    target = 24000 * 30  # the slow listener stops after 30 s of audio

    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr], options=opts) as speech:

            async def producer() -> None:
                nonlocal pushed
                for i in range(0, len(text), 50):
                    await speech.push(text[i : i + 50])
                    pushed += 50

            async def slow_consumer() -> None:
                nonlocal consumed
                async for block in arr:
                    consumed += block.size
                    if consumed >= target:
                        return
                    await asyncio.sleep(0.0005)  # a slow sink, not synchronisation

            tracemalloc.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    pusher = tg.create_task(producer())
                    await slow_consumer()
                    pending = speech.pending_chars
                    lanes = speech.queue_stats()
                    pusher.cancel()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            await speech.interrupt()
    assert consumed >= target
    # back-pressure held the producer: ~500 chars were spoken, the budget is 1000
    assert pushed < 5_000, pushed
    assert pending <= opts.max_pending_chars + 50
    (lane,) = lanes
    assert lane.peak_queued_samples <= lane.capacity_samples == 24000
    assert peak < 16 * 1024 * 1024, peak  # the whole process, server included


async def test_first_clause_commit_gets_audio_before_the_sentence_ends(
    voice: Voice, enroll: Enroll
) -> None:
    # A server that cuts only at sentence ends and never on idle: without the early commit
    # "Well, " would wait for the rest of the sentence.
    async with (
        asyncio.timeout(TIMEOUT),
        LocalServer(port=0, backend="tone", cut_idle_s=None) as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as engine,
    ):
        v = Voice(await enroll(srv), MODEL)
        arr = ArraySink(max_blocks=10_000)
        async with engine.speak(v, sinks=[arr], first_commit="clause") as speech:
            await speech.push("Well, ")
            first = await arr.get()  # arrives although the sentence is not complete
            assert first is not None and first.size > 0
            await speech.push("that settles it")
            await speech.push(" then.")
        m = speech.metrics
        assert m.responses == 2
        assert m.billed_characters == len("Well, that settles it then.")


async def test_commit_mode_synthesizes_on_commit(engine: Engine, voice: Voice) -> None:
    arr = ArraySink(max_blocks=10_000)
    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr], mode="commit") as speech:
            await speech.push("One sentence. And more")
            await speech.commit()
            assert (await arr.get()) is not None  # the commit produced audio
            await speech.push(" text left for the finish.")
        m = speech.metrics
    assert m.responses == 2  # the commit and the implicit one at session.finish


async def test_stalled_session_makes_the_exit_time_out(server: LocalServer, voice: Voice) -> None:
    server.faults.set(stall_after_deltas=3)
    opts = SpeechOptions(drain_timeout=0.5)
    arr = ArraySink(max_blocks=10_000)
    async with (
        asyncio.timeout(TIMEOUT),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0, speech=opts) as e,
    ):
        with pytest.raises(Timeout, match=r"session\.finished"):
            async with e.speak(voice, sinks=[arr]) as speech:
                await speech.push("A sentence that will stall after three deltas.")
        got = await arr.read_all(within=TIMEOUT)
    assert got.size == 3 * 2400  # what came before the stall reached the sink
    assert speech.metrics.error is not None


async def test_server_error_surfaces_on_next_push(server: LocalServer, voice: Voice) -> None:
    server.faults.set(error_event_at="delta:1", error_code="InternalError")  # socket stays open
    async with (
        asyncio.timeout(TIMEOUT),
        Engine(base_url=server.base_url, api_key=server.api_key, pool_size=0) as e,
    ):
        with pytest.raises(ServerError) as info:
            async with e.speak(voice, sinks=[ArraySink(max_blocks=10_000)]) as speech:
                await speech.push("First sentence.")
                while True:  # the error arrives asynchronously; push until it surfaces
                    await speech.push(" more.")
                    await asyncio.sleep(0)
        assert info.value.code == "InternalError"


async def test_misuse_raises_usage_errors(engine: Engine, voice: Voice) -> None:
    arr = ArraySink(max_blocks=10_000)
    speech = engine.speak(voice, sinks=[arr])
    with pytest.raises(ClosedError):
        await speech.push("not entered")
    async with asyncio.timeout(TIMEOUT):
        async with speech:
            with pytest.raises(UsageError):
                await speech.push(42)  # type: ignore[arg-type]
            await speech.commit()  # nothing pushed: a no-op, not a server error
        with pytest.raises(ClosedError):
            await speech.push("after exit")
        with pytest.raises(UsageError):
            await speech.interrupt()
    with pytest.raises(UsageError):
        engine.speak(voice, sinks=[])


@pytest.mark.parametrize("mode", ["server_commit", "commit"])
async def test_session_lost_before_any_audio_is_retried_with_the_text_replayed(
    enroll: Enroll, mode: str
) -> None:
    # The server closes sessions idle for 0.3 s (code 1000): a session that dies before its
    # first audio must be replaced without the caller noticing, its text events replayed once.
    async def script(speech: Any) -> None:
        await speech.push("Hello")
        await speech.push(" there.")
        await speech.commit()
        await speech.push(" Bye.")

    async with (
        asyncio.timeout(TIMEOUT),
        LocalServer(port=0, backend="tone", session_timeout_s=0.3) as srv,
        Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0) as engine,
    ):
        v = Voice(await enroll(srv), MODEL)
        ref = ArraySink(max_blocks=10_000)
        async with engine.speak(v, sinks=[ref], mode=mode) as speech:
            await script(speech)
        expected = await ref.read_all(within=TIMEOUT)
        arr = ArraySink(max_blocks=10_000)
        async with engine.speak(v, sinks=[arr], mode=mode) as speech:
            # Wait until the server's idle close took this speech's session and the speech
            # dialled a replacement (the server's counter says).
            opened = srv.stats().sessions_opened
            while srv.stats().sessions_opened == opened:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)
            await script(speech)
        got = await arr.read_all(within=TIMEOUT)
    assert np.array_equal(got, expected)  # complete and exactly once
    m = speech.metrics
    assert m.retries == 1 and m.error is None and m.responses == 2


async def test_barge_in_from_another_task_while_the_block_is_finishing(
    engine: Engine, voice: Voice
) -> None:
    arr = ArraySink(max_blocks=4)
    reports = []

    async def listener(speech: Any) -> None:
        for _ in range(3):
            assert (await arr.get()) is not None
        reports.append(await speech.interrupt())  # the user started talking

    async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
        async with engine.speak(voice, sinks=[arr]) as speech:
            tg.create_task(listener(speech))
            await speech.push("".join(SENTENCES) * 3)
        # leaving the block waited for session.finished; the barge-in ended that wait
    (report,) = reports
    assert report.played_ms == {"array": pytest.approx(300.0)}
    assert speech.metrics.interrupted


async def test_one_huge_push_is_paced_by_the_budget_too(engine: Engine, voice: Voice) -> None:
    opts = SpeechOptions(max_pending_chars=400)
    arr = ArraySink(max_blocks=4)
    text = "Many words in one single push call. " * 200  # 7200 chars in one push
    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr], options=opts) as speech:
            push = asyncio.ensure_future(speech.push(text))
            for _ in range(20):  # a listener takes two seconds of audio
                assert (await arr.get()) is not None
            assert not push.done()  # still paced by the budget
            assert speech.pending_chars <= 400 + 100
            push.cancel()
            with pytest.raises(asyncio.CancelledError):
                await push
            await speech.interrupt()


async def test_interrupt_report_is_exact_for_fully_played_responses(
    engine: Engine, voice: Voice
) -> None:
    first, second = "One sentence.", " Then a much longer second sentence follows here."
    n_first = (await reference(engine, voice, first, mode="commit")).size
    arr = ArraySink(max_blocks=4)
    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr], mode="commit") as speech:
            await speech.push(first)
            await speech.commit()
            await speech.push(second)
            await speech.commit()
            taken = 0
            while taken < n_first + 2400:  # all of the first response, a bit of the second
                block = await arr.get()
                assert block is not None
                taken += block.size
            report = await speech.interrupt()
    assert report.played_ms["array"] == pytest.approx(taken / 24.0)
    assert report.spoken_text.startswith(first)  # known exactly: billed and fully played
    assert len(report.spoken_text) < len(first + second)
    assert report.spoken_text + report.unspoken_text == first + second
    assert report.dropped_responses == 1


# --- commit without noise (issue 11) -------------------------------------------------------


async def test_commit_after_the_servers_cut_sends_nothing(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    arr = ArraySink(max_blocks=10_000)
    async with engine.speak(voice, sinks=[arr]) as speech:
        await speech.push("Hello there.")  # a sentence end: the server cuts on its own
        assert await arr.get() is not None  # its audio is here, so its cut was seen before
        before = server.stats()
        await speech.commit()
    after = server.stats()
    # The server received session.finish and nothing else, and answered no error.
    assert after.client_events - before.client_events == 1
    assert after.errors_sent == before.errors_sent
    assert speech.metrics.error is None


@pytest.mark.parametrize("on_loss", ["fail", "resume"])
async def test_a_commit_overtaken_by_the_servers_cut_is_no_server_error(
    server: LocalServer, engine: Engine, voice: Voice, caplog: pytest.LogCaptureFixture,
    on_loss: Literal["fail", "resume"],
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="tts_stream")
    errors_before = server.stats().errors_sent
    for i in range(20):  # the race is on the wire: repeat until the server has seen it
        async with engine.speak(voice, sinks=[ArraySink(max_blocks=10_000)],
                                on_loss=on_loss) as speech:  # fmt: skip
            await speech.push(f"Sentence {i}.")  # the server cuts at the period...
            await speech.commit()  # ...while this commit is on its way
        assert speech.metrics.error is None
        if server.stats().errors_sent > errors_before:
            break
    assert server.stats().errors_sent > errors_before  # the race happened (empty buffer)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert any("overtaken" in r.getMessage() for r in caplog.records)
