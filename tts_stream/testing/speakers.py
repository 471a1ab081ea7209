"""Distinct sample speakers and the likeness measurement shared by tests and bench/likeness.py.

Speakers (all made here, deterministic but for piper's voice noise):

* ``piper_x<r>``: the piper voice reading :data:`.samplegen.SENTENCES` "on tape" played
  ``r`` times faster (resampling: pitch and formants scale by ``r``), then cut to 12 s. An
  algorithm unlike the server's transform (Praat PSOLA), so the measure is not circular.
* ``espeak_<variant>``: espeak-ng variants at several pitches (``samplegen.speech``).

:func:`measure` enrolls each speaker's sample on a running :class:`LocalServer`, speaks
:data:`TEST_TEXT` (a text none of them read) with each voice through the engine, and also
speaks it with the backend untransformed; every output is compared with every sample by
the torch-free resemblyzer encoder (:mod:`tts_stream.testing.voice_encoder`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import soxr

from sinks import ArraySink
from tts_stream import Engine
from tts_stream.server import LocalServer
from tts_stream.server.piper import PIPER_SAMPLE_RATE, synthesize_piper
from tts_stream.testing.samplegen import SENTENCES, speech, wav_bytes
from tts_stream.testing.voice_encoder import VoiceEncoder, cosine

__all__ = [
    "ESPEAK_SPEAKERS", "PIPER_SPEAKERS", "TEST_TEXT", "Result", "measure", "piper_sample_wav",
    "sample",
]  # fmt: skip

PCM16 = npt.NDArray[np.int16]
RATE = 24000
TEST_TEXT = (
    "Every voice should sound like the person who recorded the sample. "
    "This is a different text from the one they read, spoken by the local server."
)
PIPER_SPEAKERS = {f"piper_x{r}": r for r in (0.8, 1.12, 1.25, 1.4, 1.55, 1.7)}
ESPEAK_SPEAKERS = {
    "espeak_m3": ("en-us+m3", 25), "espeak_m1": ("en-us+m1", 55),
    "espeak_f2": ("en-us+f2", 50), "espeak_f4": ("en-us+f4", 75),
    "espeak_klatt": ("en-us+klatt", 40), "espeak_f5": ("en-us+f5", 40),
}  # fmt: skip


@functools.cache
def _piper_reading() -> PCM16:
    pause = np.zeros(int(0.4 * PIPER_SAMPLE_RATE), np.int16)
    pairs = [" ".join(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)]
    parts = [p for t in pairs for p in (synthesize_piper(t), pause)]  # > 3 s of speech each
    return np.concatenate(parts)


@functools.cache
def sample(name: str, seconds: float = 12.0) -> PCM16:
    """A speaker's 24 kHz sample (read-only)."""
    pcm: PCM16
    if name in PIPER_SPEAKERS:
        r = PIPER_SPEAKERS[name]
        tape = soxr.resample(_piper_reading().astype(np.float32), PIPER_SAMPLE_RATE * r, RATE)
        pcm = np.clip(np.rint(tape[: int(seconds * RATE)]), -32768, 32767).astype(np.int16)
    else:
        voice, pitch = ESPEAK_SPEAKERS[name]
        pcm = speech(seconds, rate=RATE, voice=voice, pitch=pitch)
    pcm.flags.writeable = False
    return pcm


def piper_sample_wav() -> bytes:
    """A WAV sample whose base voice is piper (``piper_x1.12``): for tests that enroll a
    voice and need the piper backend to speak it with piper, not with an espeak variant."""
    return wav_bytes(sample("piper_x1.12"), RATE)


@dataclass(frozen=True)
class Result:
    speaker: str
    own_untransformed: float  # cos(backend untransformed, own sample)
    own: float  # cos(backend with this voice, own sample)
    best_other: float  # highest cos(backend with this voice, another speaker's sample)
    best_other_name: str
    row: tuple[float, ...] = ()  # cos(backend with this voice, each sample), in set order

    @property
    def gain(self) -> float:
        return self.own - self.own_untransformed

    @property
    def closest_is_own(self) -> bool:
        return self.own > self.best_other


@functools.cache
def _encoder() -> VoiceEncoder:
    return VoiceEncoder()


async def measure(srv: LocalServer, backend: str, speakers: list[str]) -> list[Result]:
    """Enroll, speak and compare (see the module docstring); ``srv`` runs ``backend``."""
    enc = _encoder()
    refs = {n: enc.embed(sample(n), RATE) for n in speakers}
    async with Engine(base_url=srv.base_url, api_key=srv.api_key) as engine:
        outputs: dict[str, PCM16] = {}
        path = srv.data_dir / "speaker.wav" if srv.data_dir else None
        assert path is not None
        for name in speakers:
            path.write_bytes(wav_bytes(sample(name), RATE))
            voice = await engine.voices.create(path, preferred_name="likeness")
            sink = ArraySink(max_blocks=4096)
            await engine.say(voice, TEST_TEXT, sinks=[sink])
            outputs[name] = await sink.read_all()
            await engine.voices.delete(voice)
        path.unlink()
    plain = await _untransformed(backend)
    e_plain = enc.embed(plain, RATE)
    results = []
    for name in speakers:
        e = enc.embed(outputs[name], RATE)
        others = {o: cosine(e, refs[o]) for o in speakers if o != name}
        other = max(others, key=others.__getitem__)
        row = tuple(cosine(e, refs[o]) for o in speakers)
        results.append(Result(name, cosine(e_plain, refs[name]), cosine(e, refs[name]),
                              others[other], other, row))  # fmt: skip
    return results


async def _untransformed(backend: str) -> PCM16:
    """The backend's own voice (no speaker features) reading the test text."""
    from contextlib import aclosing

    from tts_stream.server.synth import VoiceProfile, make_synthesizer

    synth = make_synthesizer(backend)
    stream = synth.stream(TEST_TEXT, sample_rate=RATE, language="English", profile=VoiceProfile())
    async with aclosing(stream):  # type: ignore[type-var]
        return np.concatenate([c async for c in stream])
