"""Test-data generator shared by every test suite: real espeak speech and clone samples.

Speech comes from the local server's espeak driver (``tts_stream.server.synth.synthesize``),
so it is real synthesized speech, not a tone. Containers are written in memory: WAV with the
stdlib ``wave`` module (any width, mono or stereo), MP3 and M4A through PyAV's bundled FFmpeg.

``good_sample_wav()`` passes every rule of protocol.md §4.7; each ``*_wav``/``*_bytes``
builder below breaks exactly the rule its name says (see :data:`BAD_SAMPLES`). Everything is
deterministic and cached in-process: tests call these a lot. Arrays returned to callers are
fresh copies, so a test that modifies one cannot poison the cache.
"""

from __future__ import annotations

import functools
import io
import struct
import wave
from collections.abc import Callable
from typing import cast

import av
import numpy as np
import numpy.typing as npt

from tts_stream.server.synth import synthesize

__all__ = [
    "BAD_SAMPLES",
    "SENTENCES",
    "SENTENCES_ZH",
    "eight_bit_wav",
    "garbage_bytes",
    "good_sample_m4a",
    "good_sample_mp3",
    "good_sample_wav",
    "long_pauses_wav",
    "long_wav",
    "low_rate_wav",
    "m4a_bytes",
    "mp3_bytes",
    "noise_wav",
    "oversize_wav",
    "short_speech_wav",
    "silence_wav",
    "speech",
    "stereo_wav",
    "wav_bytes",
    "words",
]

PCM16 = npt.NDArray[np.int16]

SENTENCES: tuple[str, ...] = (
    "Hello, I am recording this sample so that the system can learn my voice.",
    "Today I will read a short passage about the weather and the sea.",
    "The morning was bright and calm, and the boats left the harbour early.",
    "By noon a cool wind came from the west and the clouds grew dark.",
    "Everyone hurried home before the first heavy drops of rain began to fall.",
    "In the evening the sky cleared again, and the stars came out one by one.",
)
SENTENCES_ZH: tuple[str, ...] = (
    "你好，我正在录制这段声音，让系统学习我的声音。",
    "今天的天气很好，我们一起去公园散步吧。",
    "早上的阳光很明亮，小船很早就离开了港口。",
    "晚上天空又晴朗了，星星一颗一颗地出来了。",
)
_WORDS: tuple[str, ...] = ("hello", "morning", "water", "yellow", "garden", "window", "river")

_SAMPLE_RATE = 24000
_LEAD_S = 0.25  # silence before the first word, as in a real recording
_DITHER = 3.0  # ~ -80 dBFS noise floor: real recordings are never digital zero


def _silence(seconds: float, rate: int) -> PCM16:
    return np.zeros(int(round(seconds * rate)), np.int16)


def _trim(pcm: PCM16, threshold: int = 200) -> PCM16:
    """Cut leading and trailing near-silence (espeak pads each clause)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return pcm[loud[0] : loud[-1] + 1] if loud.size else pcm[:0]


def _dither(pcm: PCM16, seed: int) -> PCM16:
    rng = np.random.default_rng(seed)
    noisy = pcm.astype(np.float64) + rng.normal(0.0, _DITHER, pcm.size)
    return np.clip(np.round(noisy), -32768, 32767).astype(np.int16)


def _frozen(pcm: PCM16) -> PCM16:
    pcm.flags.writeable = False
    return pcm


@functools.lru_cache(maxsize=64)
def _utterance(text: str, rate: int, voice: str, pitch: int | None) -> PCM16:
    return _frozen(_trim(synthesize(text, sample_rate=rate, voice=voice, pitch=pitch)))


@functools.lru_cache(maxsize=64)
def _speech(seconds: float, rate: int, voice: str, pitch: int | None, pauses_s: float) -> PCM16:
    texts = SENTENCES_ZH if voice.startswith(("cmn", "zh", "yue")) else SENTENCES
    total = int(round(seconds * rate))
    parts: list[PCM16] = [_silence(_LEAD_S, rate)]
    i = 0
    while sum(p.size for p in parts) < total:
        if i:
            parts.append(_silence(pauses_s, rate))
        parts.append(_utterance(texts[i % len(texts)], rate, voice, pitch))
        i += 1
    pcm = np.concatenate(parts)[:total].copy()
    fade = min(pcm.size, rate // 100)  # 10 ms fade-out: the cut may fall inside a word
    if fade:
        pcm[-fade:] = (pcm[-fade:] * np.linspace(1.0, 0.0, fade)).astype(np.int16)
    return _frozen(_dither(pcm, seed=total))


def speech(
    seconds: float = 12.0,
    *,
    rate: int = _SAMPLE_RATE,
    voice: str = "en-us",
    pitch: int | None = None,
    pauses_s: float = 0.4,
) -> PCM16:
    """``seconds`` of real espeak reading (int16 mono at ``rate``), sentences ``pauses_s`` apart.

    ``voice`` is an espeak voice (``"en-us"``, ``"en-us+f2"`` for a female voice, ``"cmn"`` reads
    Chinese sentences); ``pitch`` the espeak pitch parameter 0–100 (``None``: 50). The clip
    starts with 0.25 s of silence and is cut (with a 10 ms fade) at exactly ``seconds``.
    """
    return _speech(float(seconds), rate, voice, pitch, float(pauses_s)).copy()


def words(gap_s: float, *, count: int, rate: int = _SAMPLE_RATE, voice: str = "en-us") -> PCM16:
    """``count`` isolated words separated by ``gap_s`` of silence (int16 mono at ``rate``)."""
    return _words(float(gap_s), count, rate, voice).copy()


@functools.lru_cache(maxsize=16)
def _words(gap_s: float, count: int, rate: int, voice: str) -> PCM16:
    parts: list[PCM16] = [_silence(_LEAD_S, rate)]
    for i in range(count):
        if i:
            parts.append(_silence(gap_s, rate))
        parts.append(_utterance(_WORDS[i % len(_WORDS)], rate, voice, None))
    parts.append(_silence(_LEAD_S, rate))
    return _frozen(_dither(np.concatenate(parts), seed=count))


# --------------------------------------------------------------------------- containers


def wav_bytes(
    samples: npt.NDArray[np.int16], rate: int, *, channels: int = 1, sampwidth: int = 2
) -> bytes:
    """A RIFF/WAVE file of int16 ``samples`` (1-D, or (n, channels)) at ``sampwidth`` bytes.

    A 1-D input with ``channels > 1`` is copied to every channel. ``sampwidth`` 1 writes
    unsigned 8-bit, 3 packed 24-bit, 4 32-bit integer PCM (the int16 values scaled up).
    """
    pcm = np.asarray(samples, dtype=np.int16)
    if pcm.ndim == 1 and channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    if pcm.ndim == 2 and pcm.shape[1] != channels:
        raise ValueError(f"samples have {pcm.shape[1]} channels, not {channels}")
    flat = pcm.reshape(-1).astype(np.int32)
    if sampwidth == 1:
        raw = ((flat >> 8) + 128).astype(np.uint8).tobytes()
    elif sampwidth == 2:
        raw = flat.astype("<i2").tobytes()
    elif sampwidth == 3:
        raw = (flat << 8).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    elif sampwidth == 4:
        raw = (flat << 16).astype("<i4").tobytes()
    else:
        raise ValueError(f"unsupported sampwidth {sampwidth}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(sampwidth)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def _encode(samples: npt.NDArray[np.int16], rate: int, fmt: str, codec: str) -> bytes:
    pcm = np.ascontiguousarray(np.asarray(samples, dtype=np.int16).reshape(1, -1))
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = cast(av.AudioStream, container.add_stream(codec, rate=rate, layout="mono"))
        stream.bit_rate = 64000
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        # PyAV's encoder resamples to the codec's sample format and frame size itself.
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def mp3_bytes(samples: npt.NDArray[np.int16], rate: int) -> bytes:
    """An MP3 file (libmp3lame, 64 kbit/s, mono) of int16 ``samples`` at ``rate``."""
    return _encode(samples, rate, "mp3", "libmp3lame")


def m4a_bytes(samples: npt.NDArray[np.int16], rate: int) -> bytes:
    """An M4A file (AAC in MP4, 64 kbit/s, mono) of int16 ``samples`` at ``rate``."""
    return _encode(samples, rate, "ipod", "aac")


# --------------------------------------------------------------------------- clone samples


@functools.lru_cache(maxsize=16)
def good_sample_wav(
    seconds: float = 12.0, *, pitch: int | None = None, voice: str = "en-us"
) -> bytes:
    """A 24 kHz mono 16-bit WAV of ``seconds`` of reading: passes every rule of §4.7."""
    return wav_bytes(_speech(float(seconds), _SAMPLE_RATE, voice, pitch, 0.4), _SAMPLE_RATE)


@functools.lru_cache(maxsize=4)
def good_sample_mp3(seconds: float = 12.0) -> bytes:
    """The good sample as a 24 kHz MP3."""
    return mp3_bytes(_speech(float(seconds), _SAMPLE_RATE, "en-us", None, 0.4), _SAMPLE_RATE)


@functools.lru_cache(maxsize=4)
def good_sample_m4a(seconds: float = 12.0) -> bytes:
    """The good sample as a 24 kHz M4A (AAC)."""
    return m4a_bytes(_speech(float(seconds), _SAMPLE_RATE, "en-us", None, 0.4), _SAMPLE_RATE)


@functools.cache
def stereo_wav() -> bytes:
    """Breaks ``channels``: the good speech on two channels."""
    return wav_bytes(_speech(12.0, _SAMPLE_RATE, "en-us", None, 0.4), _SAMPLE_RATE, channels=2)


@functools.cache
def low_rate_wav() -> bytes:
    """Breaks ``sample_rate``: the good speech at 16 kHz."""
    return wav_bytes(_speech(12.0, 16000, "en-us", None, 0.4), 16000)


@functools.cache
def long_wav() -> bytes:
    """Breaks ``duration``: 70 s of reading."""
    return wav_bytes(_speech(70.0, _SAMPLE_RATE, "en-us", None, 0.4), _SAMPLE_RATE)


@functools.cache
def noise_wav() -> bytes:
    """Breaks ``speech``: 12 s of white noise (about -13 dBFS RMS)."""
    rng = np.random.default_rng(7)
    noise = np.clip(rng.normal(0.0, 7000.0, 12 * _SAMPLE_RATE), -32768, 32767).astype(np.int16)
    return wav_bytes(noise, _SAMPLE_RATE)


@functools.cache
def silence_wav() -> bytes:
    """Breaks ``speech``: 12 s of near silence (dither only)."""
    return wav_bytes(_dither(_silence(12.0, _SAMPLE_RATE), seed=1), _SAMPLE_RATE)


@functools.cache
def long_pauses_wav() -> bytes:
    """Breaks ``pauses`` (and ``speech``): single words separated by 2.6 s of silence."""
    return wav_bytes(_words(2.6, 5, _SAMPLE_RATE, "en-us"), _SAMPLE_RATE)


@functools.cache
def short_speech_wav() -> bytes:
    """Breaks only ``speech``: words 1.2 s apart, so no run reaches 3 s, no pause exceeds 2 s."""
    return wav_bytes(_words(1.2, 7, _SAMPLE_RATE, "en-us"), _SAMPLE_RATE)


@functools.cache
def eight_bit_wav() -> bytes:
    """Breaks ``bit_depth``: the good speech as unsigned 8-bit PCM."""
    return wav_bytes(_speech(12.0, _SAMPLE_RATE, "en-us", None, 0.4), _SAMPLE_RATE, sampwidth=1)


@functools.cache
def oversize_wav() -> bytes:
    """Breaks ``size`` and ``data_uri_size`` only: the good sample plus a 10.5 MB junk chunk.

    An unknown RIFF chunk is legal and skipped by readers, so only the file size is wrong.
    """
    good = good_sample_wav()
    junk = b"junk" + struct.pack("<I", 10_500_000) + bytes(10_500_000)
    body = good[12:] + junk
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@functools.cache
def garbage_bytes() -> bytes:
    """Breaks ``format``: 64 kB of random bytes that match no container signature."""
    return b"\x00GARBAGE" + np.random.default_rng(3).bytes(64_000)


BAD_SAMPLES: dict[str, tuple[Callable[[], bytes], frozenset[str]]] = {
    "stereo": (stereo_wav, frozenset({"channels"})),
    "16khz": (low_rate_wav, frozenset({"sample_rate"})),
    "70s": (long_wav, frozenset({"duration"})),
    "noise": (noise_wav, frozenset({"speech"})),
    "silence": (silence_wav, frozenset({"speech"})),
    "long_pauses": (long_pauses_wav, frozenset({"speech", "pauses"})),
    "short_speech": (short_speech_wav, frozenset({"speech"})),
    "8bit": (eight_bit_wav, frozenset({"bit_depth"})),
    "oversize": (oversize_wav, frozenset({"size", "data_uri_size"})),
    "garbage": (garbage_bytes, frozenset({"format"})),
}
"""Bad case name → (builder, the exact set of rules ``inspect_sample`` must report)."""


# --------------------------------------------------------------------------- recording quality
#
# Samples that pass the hard rules but were recorded badly, each in one way the recording
# guide warns about (tests/test_quality.py), and the clean reference they derive from. All
# are 12 s, 24 kHz mono int16 arrays; ``wav_bytes(x, 24000)`` makes a file of one.


def _to_pcm16(x: npt.NDArray[np.float64]) -> PCM16:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def _active_power(pcm: PCM16, rate: int = _SAMPLE_RATE) -> float:
    """Mean power of the 30 ms frames within 30 dB of the loudest (the speech, not the gaps)."""
    n = int(0.03 * rate)
    x = pcm[: pcm.size // n * n].astype(np.float64).reshape(-1, n)
    p = np.mean(x**2, axis=1)
    return float(np.mean(p[p >= p.max() * 1e-3]))


def noisy_speech(snr_db: float, *, seconds: float = 12.0, seed: int = 11) -> PCM16:
    """Speech plus steady fan-like noise (white noise low-passed at ~2 kHz) at ``snr_db``.

    The SNR is the speech frames' power over the noise power, as ``measure_quality`` defines it.
    """
    clean = _speech(float(seconds), _SAMPLE_RATE, "en-us", None, 0.4)
    rng = np.random.default_rng(seed)
    white = rng.normal(0.0, 1.0, clean.size + 64)
    noise = np.convolve(white, np.hanning(12), mode="same")[: clean.size]
    noise *= np.sqrt(_active_power(clean) / 10 ** (snr_db / 10) / np.mean(noise**2))
    return _to_pcm16(clean.astype(np.float64) + noise)


def clipped_speech(gain: float = 4.0) -> PCM16:
    """Speech amplified ``gain`` times into the int16 limits (a too-hot input gain)."""
    clean = _speech(12.0, _SAMPLE_RATE, "en-us", None, 0.4)
    return _to_pcm16(clean.astype(np.float64) * gain)


def scaled_speech(gain_db: float, *, offset: float = 0.0) -> PCM16:
    """Speech at ``gain_db`` (0: as synthesized, peaks near -1 dBFS) plus a DC ``offset``.

    ``offset`` is a share of full scale (0.03: +3 %).
    """
    clean = _speech(12.0, _SAMPLE_RATE, "en-us", None, 0.4).astype(np.float64)
    return _to_pcm16(clean * 10 ** (gain_db / 20) + offset * 32768)


def paused_speech(pause_s: float = 3.0) -> PCM16:
    """Sentences ``pause_s`` apart (3.0 breaks the 2 s pause rule)."""
    return _speech(16.0, _SAMPLE_RATE, "en-us", None, float(pause_s)).copy()


def room_impulse_response(t60_s: float, *, rate: int = _SAMPLE_RATE, seed: int = 5) -> npt.NDArray[
    np.float64
]:
    """A synthetic room: a direct path, then exponentially decaying noise reaching -60 dB at
    ``t60_s`` (Schroeder's statistical model), the reverberant energy 3 dB under the direct."""
    n = int(t60_s * rate)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    tail = rng.normal(0.0, 1.0, n) * 10 ** (-3.0 * t / t60_s)  # -60 dB at t60
    tail[: int(0.002 * rate)] = 0.0  # first reflections after 2 ms
    tail *= np.sqrt(0.5 / np.sum(tail**2))
    tail[0] = 1.0
    return tail


def reverberant_speech(t60_s: float) -> PCM16:
    """Speech convolved with :func:`room_impulse_response`, peak back at the clean peak."""
    clean = _speech(12.0, _SAMPLE_RATE, "en-us", None, 0.4).astype(np.float64)
    wet = np.convolve(clean, room_impulse_response(t60_s))[: clean.size]
    wet *= np.max(np.abs(clean)) / np.max(np.abs(wet))
    return _dither(_to_pcm16(wet), seed=int(t60_s * 1000))


def music_like(seconds: float = 12.0, *, seed: int = 2) -> PCM16:
    """A melody of held harmonic notes (eight harmonics, 5 Hz vibrato of +-0.3 semitone,
    0.3-0.6 s each, 60 ms breaths between some), like a sung or played line."""
    rng = np.random.default_rng(seed)
    rate = _SAMPLE_RATE
    scale = [0, 2, 4, 5, 7, 9, 11, 12]
    parts: list[npt.NDArray[np.float64]] = [np.zeros(int(_LEAD_S * rate))]
    total = int(seconds * rate)
    while sum(p.size for p in parts) < total:
        f0 = 196.0 * 2 ** (scale[int(rng.integers(len(scale)))] / 12)
        dur = float(rng.uniform(0.3, 0.6))
        t = np.arange(int(dur * rate)) / rate
        f = f0 * 2 ** (0.3 * np.sin(2 * np.pi * 5 * t) / 12)
        phase = 2 * np.pi * np.cumsum(f) / rate
        note = sum(np.sin(k * phase) / k for k in range(1, 9))
        env = np.minimum(1.0, np.minimum(t / 0.03, (dur - t) / 0.05))
        parts.append(note * env)
        if rng.random() < 0.3:
            parts.append(np.zeros(int(0.06 * rate)))
    x = np.concatenate(parts)[:total]
    return _dither(_to_pcm16(x / np.max(np.abs(x)) * 20000), seed=seed)


def two_speakers() -> PCM16:
    """Two voices taking turns sentence by sentence: espeak's male voice and a high female."""
    rate = _SAMPLE_RATE
    parts: list[PCM16] = [_silence(_LEAD_S, rate)]
    for i, text in enumerate(SENTENCES[:4]):
        voice, pitch = ("en-us", 30) if i % 2 == 0 else ("en-us+f2", 90)
        parts += [_utterance(text, rate, voice, pitch), _silence(0.4, rate)]
    return _dither(np.concatenate(parts)[: 12 * rate], seed=4)
