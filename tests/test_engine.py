"""The Engine end to end against the real LocalServer (tone backend, burst pacing).

Faults come from the server's knobs; sinks are the real WavSink and ArraySink. Engines that
test faults use ``pool_size=0`` so that every session is dialled on demand and the fault
lands on the session under test (a background spare would consume it otherwise).
"""

from __future__ import annotations

import asyncio
import gc
import wave
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tts_stream.engine
from sinks import ArraySink, WavSink
from tests.conftest import Enroll
from tts_stream import (
    AuthenticationError,
    ConnectionLost,
    Engine,
    HandshakeRejected,
    ModelMismatch,
    RateLimited,
    ServerError,
    UsageError,
    Voice,
)
from tts_stream.messages import VC_MODELS
from tts_stream.server import LocalServer

TIMEOUT = 30.0
MODEL = VC_MODELS[0]
TEXT = "Hello there. This is a test of the engine, with two sentences."


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> Voice:
    return Voice(await enroll(server), MODEL)


def engine_for(srv: LocalServer, **kwargs: Any) -> Engine:
    return Engine(base_url=srv.base_url, api_key=srv.api_key, **kwargs)


@pytest.fixture
async def engine(server: LocalServer) -> AsyncIterator[Engine]:
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0) as eng:
        yield eng


def wav_samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2")


async def say_to_array(engine: Engine, voice: Voice, text: str, **kw: Any) -> np.ndarray:
    arr = ArraySink(max_blocks=100_000)
    async with asyncio.timeout(TIMEOUT):
        await engine.say(voice, text, sinks=[arr], **kw)
        return await arr.read_all(within=TIMEOUT)


@pytest.mark.parametrize("mode", ["server_commit", "commit"])
async def test_say_delivers_every_sample_the_server_sent(
    server: LocalServer, engine: Engine, voice: Voice, tmp_path: Path, mode: str
) -> None:
    arr = ArraySink(max_blocks=100_000)
    out = tmp_path / "out.wav"
    async with asyncio.timeout(TIMEOUT):
        async with engine.speak(voice, sinks=[arr, WavSink(out)], mode=mode) as speech:
            for word in TEXT.split(" "):
                await speech.push(word + " ")
            if mode == "commit":
                await speech.commit()
        got = await arr.read_all(within=TIMEOUT)
    stats = server.stats()
    assert got.size == stats.audio_samples_sent > 0
    assert np.array_equal(wav_samples(out), got)
    m = speech.metrics
    assert m.deltas == stats.deltas_sent and m.responses == stats.responses >= 1
    assert m.billed_characters == len(TEXT.strip()) + 1 or m.billed_characters >= len(TEXT) - 2
    assert m.first_audio_ms is not None and m.first_audio_ms > 0
    assert m.response_created_ms is not None and m.response_created_ms <= m.first_audio_ms
    assert f"wav:{out}" in m.sink_first_sample_ms
    assert m.audio_ms == pytest.approx(got.size / 24.0)
    assert m.error is None and m.retries == 0
    assert list(engine.history)[-1] is m


@pytest.mark.parametrize(("status", "exc"), [(401, AuthenticationError), (429, RateLimited)])
async def test_refused_handshake_raises_without_retrying(
    server: LocalServer, engine: Engine, voice: Voice, status: int, exc: type[Exception]
) -> None:
    server.faults.set(refuse_handshake=status)
    before = server.stats().handshakes
    with pytest.raises(exc) as info:
        async with asyncio.timeout(TIMEOUT):
            await engine.say(voice, TEXT, sinks=[ArraySink(max_blocks=10_000)])
    assert getattr(info.value, "status", None) == status
    assert server.stats().handshakes == before + 1  # quick failure: no retry on 401/429
    assert server.api_key not in str(info.value) and server.api_key not in repr(info.value)


async def test_wrong_key_is_an_authentication_error(server: LocalServer, voice: Voice) -> None:
    async with asyncio.timeout(TIMEOUT), Engine(base_url=server.base_url, api_key="sk-wrong") as e:
        with pytest.raises(AuthenticationError):
            await e.say(voice, TEXT, sinks=[ArraySink()])


async def test_error_event_is_raised_as_server_error(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    server.faults.set(error_event_at="delta:2", error_code="InternalError",
                      error_message="Injected fault.", error_close_code=1011)  # fmt: skip
    with pytest.raises(ServerError) as info:
        await say_to_array(engine, voice, TEXT)
    assert info.value.code == "InternalError"
    assert "Injected fault." in str(info.value)


async def test_drop_mid_utterance_keeps_everything_received_and_never_repeats(
    server: LocalServer, engine: Engine, voice: Voice, tmp_path: Path
) -> None:
    reference = await say_to_array(engine, voice, TEXT)
    server.faults.set(drop_after_deltas=5, times=1)
    arr = ArraySink(max_blocks=100_000)
    out = tmp_path / "dropped.wav"
    with pytest.raises(ConnectionLost) as info:
        async with asyncio.timeout(TIMEOUT):
            await engine.say(voice, TEXT, sinks=[arr, WavSink(out)])
    assert info.value.audio_received is True
    assert info.value.code == 1006
    got = await arr.read_all(within=TIMEOUT)
    assert 0 < got.size < reference.size
    assert np.array_equal(got, reference[: got.size])  # a prefix: nothing repeated
    assert np.array_equal(wav_samples(out), got)  # the WAV file is valid and complete
    assert list(engine.history)[-1].error is not None


async def test_connect_failure_before_audio_is_retried_transparently(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    reference = await say_to_array(engine, voice, TEXT)
    server.faults.set(refuse_handshake=503, times=1)
    before = server.stats()
    got = await say_to_array(engine, voice, TEXT)
    assert np.array_equal(got, reference)  # complete, exactly once
    after = server.stats()
    assert after.handshakes == before.handshakes + 2
    assert after.sessions_opened == before.sessions_opened + 1
    m = list(engine.history)[-1]
    assert m.retries == 1 and m.error is None


@pytest.mark.parametrize("fault", ["drop_after_deltas", "close_after_deltas"])
async def test_connection_lost_before_audio_is_retried_with_the_text_replayed(
    server: LocalServer, engine: Engine, voice: Voice, fault: str
) -> None:
    reference = await say_to_array(engine, voice, TEXT)
    server.faults.set(**{fault: 0}, times=1)  # dies when its first audio is due
    before = server.stats()
    got = await say_to_array(engine, voice, TEXT)
    assert np.array_equal(got, reference)  # complete, exactly once
    assert server.stats().sessions_opened >= before.sessions_opened + 2
    m = list(engine.history)[-1]
    assert m.retries == 1 and m.error is None


async def test_retries_are_bounded(server: LocalServer, voice: Voice) -> None:
    from tts_stream import SpeechOptions

    server.faults.set(refuse_handshake=503, times=None)
    opts = SpeechOptions(retries=2)
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=0, speech=opts) as e:
        with pytest.raises(HandshakeRejected) as info:
            await e.say(voice, TEXT, sinks=[ArraySink()])
    assert info.value.status == 503
    assert server.stats().handshakes == 3  # the first try and two retries


async def test_model_mismatch_is_refused_before_connecting(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    before = server.stats().handshakes
    with pytest.raises(ModelMismatch) as info:
        engine.speak(voice, sinks=[ArraySink()], model=VC_MODELS[1])
    assert info.value.voice_model == MODEL
    with pytest.raises(ModelMismatch):
        await engine.say(voice, TEXT, sinks=[ArraySink()], model=VC_MODELS[1])
    with pytest.raises(UsageError, match="model is required"):
        engine.speak(voice.name, sinks=[ArraySink()])
    assert server.stats().handshakes == before


async def test_plain_voice_name_with_model(
    server: LocalServer, engine: Engine, voice: Voice
) -> None:
    got = await say_to_array(engine, voice.name, "Plain name.", model=MODEL)  # type: ignore[arg-type]
    assert got.size > 0


async def test_metrics_are_reset_for_every_utterance(server: LocalServer, voice: Voice) -> None:
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=1) as e:
        m1 = await e.say(voice, "First sentence here.", sinks=[ArraySink(max_blocks=10_000)])
        m2 = await e.say(voice, "Second.", sinks=[ArraySink(max_blocks=10_000)])
    for m in (m1, m2):
        assert m.first_audio_ms is not None and m.deltas > 0
    assert m1.text_chars == len("First sentence here.") and m2.text_chars == len("Second.")
    assert m2.deltas < m1.deltas and m2.audio_ms < m1.audio_ms
    assert m2.started_at > m1.started_at
    assert m1.was_warm is False and m2.was_warm is True
    assert m2.spare_age_s is not None and m2.spare_age_s >= 0
    summary = e.history.summary()
    assert summary["first_audio_ms"].count == 2


async def test_prewarm_makes_the_first_utterance_warm(server: LocalServer, voice: Voice) -> None:
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=1) as e:
        await e.prewarm(voice, 2)
        assert e.spares(voice) == 2
        m = await e.say(voice, "Warm start.", sinks=[ArraySink(max_blocks=10_000)])
        assert m.was_warm is True
    # the engine finished its spares gracefully on exit
    st_srv = server.stats()  # every session ended with session.finish, none dropped
    assert st_srv.sessions_finished == st_srv.sessions_opened


async def test_check_sample_needs_no_network(tmp_path: Path) -> None:
    from tts_stream.testing.samplegen import good_sample_wav

    path = tmp_path / "voice.wav"
    path.write_bytes(good_sample_wav())
    report = Engine.check_sample(path)
    assert report.ok, report.problems


async def test_engine_outside_context_and_key_never_shown(server: LocalServer) -> None:
    e = engine_for(server)
    assert server.api_key not in repr(e)
    with pytest.raises(UsageError):
        _ = e.voices
    await e.aclose()
    await e.aclose()  # idempotent


async def test_concurrent_utterances_share_the_pool(server: LocalServer, voice: Voice) -> None:
    reference: dict[str, np.ndarray] = {}
    texts = [f"Caller number {i} hears this." for i in range(6)]
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size=2) as e:
        for t in texts[:2]:
            reference[t] = await say_to_array(e, voice, t)

        async def one(text: str) -> tuple[str, np.ndarray]:
            return text, await say_to_array(e, voice, text)

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(t)) for t in texts]
        results = dict(t.result() for t in tasks)
        stats = e.pool_stats()
    for t in texts[:2]:
        assert np.array_equal(results[t], reference[t])
    assert all(results[t].size > 0 for t in texts)
    assert stats.warm_acquires >= 2
    st_srv = server.stats()  # every session ended with session.finish, none dropped
    assert st_srv.sessions_finished == st_srv.sessions_opened


def test_run_helper_drives_the_engine_on_uvloop(tmp_path: Path) -> None:
    import tts_stream
    from tts_stream.testing.enroll import enroll_voice as _enroll

    async def main() -> int:
        async with LocalServer(port=0, backend="tone") as srv:
            v = Voice(await _enroll(srv), MODEL)
            async with engine_for(srv) as e:
                arr = ArraySink(max_blocks=10_000)
                await e.say(v, "On uvloop.", sinks=[arr])
                return int((await arr.read_all(within=TIMEOUT)).size)

    assert tts_stream.run(main) > 0


async def test_cancelled_utterance_cleans_up_and_the_engine_goes_on(
    server: LocalServer, engine: Engine, voice: Voice, tmp_path: Path
) -> None:
    arr = ArraySink(max_blocks=2)  # nobody reads: the utterance can never finish
    out = tmp_path / "cut.wav"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await engine.say(voice, TEXT * 5, sinks=[arr, WavSink(out)])
    assert wav_samples(out).size > 0  # closed properly: a valid WAV with what was written
    assert list(engine.history)[-1].first_audio_ms is not None
    got = await say_to_array(engine, voice, "Still alive.")
    assert got.size > 0


async def test_telephony_only_sinks_get_8khz_from_the_server(engine: Engine, voice: Voice) -> None:
    """With only G.711 RTP sinks the server is asked for 8 kHz: no resampling on our side."""
    from sinks import RtpSink
    from tests.rtp_receiver import UdpReceiver, decode_payloads

    async with UdpReceiver() as rx:
        rtp = RtpSink("127.0.0.1", rx.port, codec="pcmu")
        async with asyncio.timeout(TIMEOUT):
            m = await engine.say(voice, "Hello from the phone line.", sinks=[rtp])
        assert m.sample_rate == 8000
        rx.flush()
        audio = decode_payloads(rx.packets, "pcmu")
        # ~60 ms per character from the tone backend, at 8 kHz, all of it sent.
        assert abs(audio.size - m.audio_ms * 8) <= 160 * 4
        arr = ArraySink(max_blocks=10_000)
        mixed = await engine.say(voice, "Hi.", sinks=[arr, RtpSink("127.0.0.1", rx.port)])
        assert mixed.sample_rate == 24000  # another sink wants the full rate: keep 24 kHz


async def test_session_options_reach_the_server(engine: Engine, voice: Voice) -> None:
    """``**session`` keys travel in session.update: speech_rate 2 halves the audio."""
    normal = await say_to_array(engine, voice, TEXT)
    fast = await say_to_array(engine, voice, TEXT, speech_rate=2.0)
    assert 0.4 < fast.size / normal.size < 0.6


async def test_a_turn_right_after_another_finds_a_warm_spare(enroll: Enroll) -> None:
    # Realtime pacing: each turn lasts as long as its audio, so the refill started at the
    # first audio of one turn has long finished when the next turn comes 50 ms later.
    async with (
        asyncio.timeout(TIMEOUT),
        LocalServer(port=0, backend="tone", pacing="realtime") as srv,
    ):
        voice = Voice(await enroll(srv), MODEL)
        async with engine_for(srv, pool_size=1) as e:
            await e.prewarm(voice, 1)
            warm = []
            for _ in range(3):
                opened = srv.stats().sessions_opened
                sink = ArraySink(max_blocks=10_000)
                metrics = await e.say(voice, "One short turn.", sinks=[sink])
                # the refill of this turn's spare was dialled during the turn, server-side
                assert srv.stats().sessions_opened == opened + 1
                warm.append(metrics.was_warm)
                await asyncio.sleep(0.05)
            st = e.stats().pool
        assert warm == [True, True, True]
        assert (st.warm_acquires, st.cold_acquires, st.cold_reasons) == (3, 0, {})


async def test_engine_stats_say_why_an_acquire_was_cold(server: LocalServer, voice: Voice) -> None:
    async with asyncio.timeout(TIMEOUT), engine_for(server, pool_size="auto") as e:
        await e.say(voice, "First.", sinks=[ArraySink(max_blocks=10_000)])
        st = e.stats().pool
        assert st.cold_reasons == {"first_use": 1}
        assert st.cold_acquires == 1 and sum(st.targets.values()) == 1


async def test_engine_freezes_the_collector_after_prewarm_unless_told_not_to(
    server: LocalServer, voice: Voice
) -> None:
    gc.unfreeze()
    async with asyncio.timeout(TIMEOUT), engine_for(server, freeze_gc=False) as e:
        await e.prewarm(voice, 1)
        assert gc.get_freeze_count() == 0
    async with asyncio.timeout(TIMEOUT), engine_for(server) as e:
        assert gc.get_freeze_count() > 0  # at start-up
        frozen = gc.get_freeze_count()
        await e.prewarm(voice, 1)
        assert gc.get_freeze_count() > frozen  # the prewarmed spare too
    gc.unfreeze()  # the rest of the suite runs with the collector as it found it


class _Cycle:
    """A little reference cycle with a weak reference to tell whether it was freed."""

    def __init__(self) -> None:
        self.me = self


async def test_a_finished_speech_is_freed_by_reference_counting_alone(
    server: LocalServer, voice: Voice
) -> None:
    # No reference cycle is left by a finished speech, a finished barge-in included: with
    # the collector off, nothing of it outlives the last reference (a cycle would wait for
    # a full collection, the pauses that made frames late at 500 streams).
    gc.collect()
    gc.disable()
    try:
        async with asyncio.timeout(TIMEOUT), engine_for(server, freeze_gc=False) as e:
            await e.prewarm(voice, 1)
            refs: list[weakref.ref[object]] = []
            for barge_in in (False, True):
                arr = ArraySink(max_blocks=100_000)
                speech = e.speak(voice, sinks=[arr])
                async with speech:
                    await speech.push(TEXT)
                    if barge_in:
                        await speech.interrupt()
                refs += [weakref.ref(speech), weakref.ref(speech._fanout), weakref.ref(arr)]
                del speech, arr
                await asyncio.sleep(0.05)  # the pool's refill and the lease's release run
            assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()


async def test_each_speech_freezes_the_young_objects_and_idle_recollects_cyclic_garbage(
    server: LocalServer, voice: Voice
) -> None:
    gc.unfreeze()
    async with asyncio.timeout(TIMEOUT), engine_for(server, freeze_gc=False) as e:
        async with e.speak(voice, sinks=[ArraySink(max_blocks=100_000)]) as speech:
            assert gc.get_freeze_count() == 0  # freeze_gc=False: the collector as it is
            await speech.push("Hello.")
    async with asyncio.timeout(TIMEOUT), engine_for(server) as e:
        await e.prewarm(voice, 2)
        frozen = gc.get_freeze_count()
        gc.disable()  # no automatic collection in between: only the engine's own ones
        first = e.speak(voice, sinks=[ArraySink(max_blocks=100_000)])
        async with first:
            assert gc.get_freeze_count() > frozen  # the speech's start is frozen: no scan
            # The application's cyclic garbage made meanwhile, more than a quarter of the
            # frozen set: the next speech's freeze catches it ...
            garbage = [_Cycle() for _ in range(gc.get_freeze_count() // 2)]
            probe = weakref.ref(garbage[0])
            del garbage
            async with e.speak(voice, sinks=[ArraySink(max_blocks=100_000)]) as second:
                assert probe() is not None  # frozen, not collected
                await second.push("Two.")
            assert probe() is not None  # ... the first speech still plays: no collection
            await first.push("One.")
        # ... and the last speech's close, at a safe point, collects the frozen set again.
        assert probe() is None
        assert gc.get_freeze_count() > 0  # and freezes what is alive once more
    gc.enable()
    gc.unfreeze()  # the rest of the suite runs with the collector as it found it


async def test_a_busy_process_recollects_once_the_frozen_set_has_doubled(
    server: LocalServer, voice: Voice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service that is never idle (a speech always playing) must not keep frozen cyclic
    # garbage for ever: once the frozen set has doubled since its last full collection, the
    # next speech to open collects it, while another still plays.
    monkeypatch.setattr(tts_stream.engine, "BUSY_RECOLLECT", 0)
    monkeypatch.setattr(tts_stream.engine, "BUSY_CHECK_EVERY", 1)
    gc.unfreeze()
    async with asyncio.timeout(TIMEOUT), engine_for(server) as e:
        await e.prewarm(voice, 2)
        gc.disable()
        try:
            async with e.speak(voice, sinks=[ArraySink(max_blocks=100_000)]) as first:
                garbage = [_Cycle() for _ in range(2 * gc.get_freeze_count() + 10)]
                probe = weakref.ref(garbage[0])
                del garbage
                assert probe() is not None  # cyclic garbage, no collection yet
                async with e.speak(voice, sinks=[ArraySink(max_blocks=100_000)]) as second:
                    assert probe() is None  # collected while the first speech plays
                    await second.push("Two.")
                await first.push("One.")
        finally:
            gc.enable()
    gc.unfreeze()
