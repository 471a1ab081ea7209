"""Synthesis backends of the local server (tts_stream.server.synth): real espeak and tone.

Everything runs the real libespeak-ng from the espeakng-loader wheel; pitch is measured on
the output with tts_stream.samples.measure_pitch. Every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import numpy as np
import pytest

from tts_stream.audio import PCM16
from tts_stream.errors import UsageError
from tts_stream.messages import LANGUAGE_TYPES
from tts_stream.samples import measure_pitch
from tts_stream.server.synth import (
    ESPEAK_SAMPLE_RATE,
    EspeakSynthesizer,
    Synthesizer,
    ToneSynthesizer,
    VoiceProfile,
    espeak_voice,
    guess_language,
    make_synthesizer,
    split_clauses,
    synthesize,
)

TEXT = (
    "Hello there. This is a streaming test of the local server, with several clauses. "
    "It should arrive quickly, chunk by chunk, and sound like real speech."
)
ZH_TEXT = "你好，世界。今天天气很好，我们一起去公园散步吧。"
WAIT = 30.0  # seconds; generous bound on any single synthesis in these tests


async def collect(
    synth: Synthesizer,
    text: str,
    *,
    sample_rate: int = 24000,
    language: str | None = "Auto",
    profile: VoiceProfile | None = None,
) -> list[PCM16]:
    async def run() -> list[PCM16]:
        stream = synth.stream(
            text, sample_rate=sample_rate, language=language, profile=profile or VoiceProfile()
        )
        async with aclosing(stream):  # type: ignore[type-var]
            return [chunk async for chunk in stream]

    return await asyncio.wait_for(run(), WAIT)


def rms(pcm: PCM16) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


# --------------------------------------------------------------------------- espeak


async def test_espeak_streams_real_speech() -> None:
    chunks = await collect(make_synthesizer("espeak"), TEXT, language="English")
    assert len(chunks) > 20  # streamed, not one blob
    assert all(c.dtype == np.int16 and c.ndim == 1 and 0 < c.size <= 2400 for c in chunks)
    pcm = np.concatenate(chunks)
    seconds = pcm.size / 24000
    words = len(TEXT.split())
    assert 0.2 * words < seconds < 0.8 * words  # ~175 words per minute plus pauses
    assert rms(pcm) > 1000
    pitch = measure_pitch(pcm, 24000)
    assert pitch is not None and 70 < pitch < 160  # default en-us is a male voice (~100 Hz)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
async def test_espeak_each_sample_rate(rate: int) -> None:
    chunks = await collect(EspeakSynthesizer(), TEXT, sample_rate=rate)
    assert all(c.size <= rate // 10 for c in chunks)  # chunks of at most 100 ms
    pcm = np.concatenate(chunks)
    native = synthesize(TEXT)  # the same speech at 22050 Hz, one shot
    assert pcm.size / rate == pytest.approx(native.size / ESPEAK_SAMPLE_RATE, rel=0.01)
    assert rms(pcm) == pytest.approx(rms(native), rel=0.15)
    if rate >= 16000:
        assert measure_pitch(pcm, rate) == pytest.approx(measure_pitch(native, 22050), rel=0.05)


@pytest.mark.parametrize("language", ["Chinese", "Auto", None])
async def test_espeak_chinese(language: str | None) -> None:
    pcm = np.concatenate(await collect(EspeakSynthesizer(), ZH_TEXT, language=language))
    assert pcm.size / 24000 > 0.15 * len(ZH_TEXT)  # every hanzi is a spoken syllable
    assert rms(pcm) > 1000
    assert measure_pitch(pcm, 24000) is not None


async def test_espeak_first_chunk_before_whole_text_is_synthesized() -> None:
    synth = EspeakSynthesizer()
    long_text = " ".join([TEXT] * 30)  # ~270 clauses, several minutes of speech
    await collect(synth, "Warm up.")  # load the library outside the measurement
    start = time.perf_counter()
    first: float | None = None
    samples = 0
    stream = synth.stream(long_text, sample_rate=24000, language="English", profile=VoiceProfile())
    async with aclosing(stream):  # type: ignore[type-var]
        async with asyncio.timeout(WAIT):
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter() - start
                samples += chunk.size
    total = time.perf_counter() - start
    assert first is not None
    assert samples / 24000 > 100  # really a long utterance
    assert first < total / 5  # first audio after one clause, not after the whole text


async def test_espeak_consumer_can_stop_early() -> None:
    stream = EspeakSynthesizer().stream(
        " ".join([TEXT] * 10), sample_rate=24000, language=None, profile=VoiceProfile()
    )
    async with aclosing(stream):  # type: ignore[type-var]
        async with asyncio.timeout(WAIT):
            first = await anext(stream)
    assert first.size > 0
    # The engine is free again for the next utterance.
    assert np.concatenate(await collect(EspeakSynthesizer(), "Still working.")).size > 0


async def test_two_espeak_streams_interleave() -> None:
    synth = make_synthesizer("espeak")
    order: list[str] = []

    async def run(tag: str, text: str) -> None:
        stream = synth.stream(text, sample_rate=24000, language="Auto", profile=VoiceProfile())
        async with aclosing(stream):  # type: ignore[type-var]
            async for _ in stream:
                order.append(tag)

    await collect(synth, "Warm up.")
    long_a = " ".join([TEXT] * 8)
    long_b = " ".join([ZH_TEXT] * 8)
    async with asyncio.timeout(WAIT):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run("a", long_a))
            tg.create_task(run("b", long_b))
    first_a, last_a = order.index("a"), len(order) - 1 - order[::-1].index("a")
    first_b, last_b = order.index("b"), len(order) - 1 - order[::-1].index("b")
    # Neither waited for the other's whole utterance: each started before the other ended,
    # and the streams switched many times (clause by clause), not once.
    assert first_b < last_a and first_a < last_b
    switches = sum(1 for x, y in zip(order, order[1:], strict=False) if x != y)
    assert switches >= 10


async def test_profile_pitch_changes_f0() -> None:
    synth = EspeakSynthesizer()
    measured = {}
    for hz in (110.0, 220.0):
        pcm = np.concatenate(await collect(synth, TEXT, profile=VoiceProfile(pitch_hz=hz)))
        f0 = measure_pitch(pcm, 24000)
        assert f0 is not None
        measured[hz] = f0
        assert f0 == pytest.approx(hz, rel=0.15)  # calibrated, not just "different"
    assert measured[220.0] - measured[110.0] > 70


def test_synthesize_one_shot() -> None:
    pcm = synthesize("One shot.", sample_rate=24000, voice="en-us+f2", pitch=60)
    assert pcm.dtype == np.int16 and pcm.size > 0.3 * 24000
    pitch = measure_pitch(pcm, 24000)
    assert pitch is not None and pitch > 160
    assert synthesize("  ").size == 0


def test_language_selection() -> None:
    assert guess_language("Hello world") == "en-us"
    assert guess_language("你好世界") == "cmn"
    assert guess_language("こんにちは世界") == "ja"  # kana wins over the kanji
    assert guess_language("안녕하세요") == "ko"
    assert guess_language("Привет, мир") == "ru"
    assert espeak_voice("Chinese", "hello") == "cmn"
    assert espeak_voice("English", "你好") == "en-us"
    assert espeak_voice("German", "Hallo") == "de"
    assert espeak_voice("French", "Bonjour") == "fr"
    assert espeak_voice("Auto", "你好") == "cmn"
    assert espeak_voice(None, "Привет") == "ru"


@pytest.mark.parametrize("language", LANGUAGE_TYPES)
async def test_every_protocol_language_speaks(language: str) -> None:
    text = {"Chinese": "你好。", "Japanese": "こんにちは。", "Korean": "안녕하세요.",
            "Russian": "Привет."}.get(language, "Hello.")  # fmt: skip
    for profile in (VoiceProfile(), VoiceProfile(110.0), VoiceProfile(220.0)):
        pcm = np.concatenate(await collect(EspeakSynthesizer(), text, language=language,
                                           profile=profile))  # fmt: skip
        assert pcm.size > 0.2 * 24000 and rms(pcm) > 500


def test_split_clauses() -> None:
    assert split_clauses("Hello, world. How are you? Fine!") == [
        "Hello,", "world.", "How are you?", "Fine!",
    ]  # fmt: skip
    assert split_clauses("你好，世界。再见！") == ["你好，", "世界。", "再见！"]
    assert split_clauses("   ") == []
    long = " ".join(["word"] * 100)
    parts = split_clauses(long)
    assert len(parts) > 1 and all(len(p) <= 160 for p in parts)
    assert " ".join(parts) == long


def test_make_synthesizer_names() -> None:
    assert make_synthesizer("espeak").name == "espeak"
    assert make_synthesizer("tone").name == "tone"
    with pytest.raises(UsageError, match="unknown synthesizer"):
        make_synthesizer("kokoro")


async def test_bad_sample_rate_is_refused() -> None:
    for name in ("espeak", "tone"):
        with pytest.raises(UsageError):
            await collect(make_synthesizer(name), "Hi.", sample_rate=100)


# --------------------------------------------------------------------------- tone


async def test_tone_is_bit_identical_and_proportional() -> None:
    synth = ToneSynthesizer()
    a = await collect(synth, TEXT)
    b = await collect(make_synthesizer("tone"), TEXT)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    pcm = np.concatenate(a)
    assert pcm.size / 24000 == pytest.approx(0.06 * len(TEXT), abs=0.25)  # ~60 ms per char
    assert all(c.size <= 2400 for c in a)
    assert rms(pcm) > 1000
    short = np.concatenate(await collect(synth, "Hi there."))
    assert short.size < pcm.size / 5
    assert await collect(synth, "") == []


async def test_tone_pitch_follows_profile_and_rate() -> None:
    synth = ToneSynthesizer()
    for hz in (110.0, 220.0):
        for rate in (8000, 48000):
            pcm = np.concatenate(await collect(synth, TEXT, sample_rate=rate,
                                              profile=VoiceProfile(hz)))  # fmt: skip
            assert pcm.size / rate == pytest.approx(0.06 * len(TEXT), abs=0.25)
            assert measure_pitch(pcm, rate) == pytest.approx(hz, rel=0.03)


async def test_tone_is_fast() -> None:
    synth = ToneSynthesizer()
    text = "x" * 2000  # 120 s of audio
    await collect(synth, text)  # warm the waveform table
    start = time.perf_counter()
    chunks = await collect(synth, text)
    per_chunk = (time.perf_counter() - start) / len(chunks)
    assert len(chunks) >= 1200
    assert per_chunk < 500e-6  # typically ~5 µs; generous for noisy CI


async def test_tone_chunks_are_independent_copies() -> None:
    synth = ToneSynthesizer()
    first = await collect(synth, "Hello.")
    first[0][:] = 0  # a consumer may modify what it got
    again = await collect(synth, "Hello.")
    assert np.any(again[0] != 0)


@pytest.mark.parametrize("synth", [EspeakSynthesizer(), ToneSynthesizer()], ids=["espeak", "tone"])
async def test_speech_rate_changes_duration(synth: Synthesizer) -> None:
    def seconds(chunks: list[PCM16]) -> float:
        return sum(c.size for c in chunks) / 24000

    normal = seconds(await collect(synth, TEXT, profile=VoiceProfile(speech_rate=1.0)))
    fast = seconds(await collect(synth, TEXT, profile=VoiceProfile(speech_rate=2.0)))
    slow = seconds(await collect(synth, TEXT, profile=VoiceProfile(speech_rate=0.5)))
    assert 0.4 < fast / normal < 0.75  # espeak's pauses do not all shrink with the rate
    assert 1.4 < slow / normal < 2.3
