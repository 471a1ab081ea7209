"""Resume after a dropped connection (``on_loss="resume"``), pure and against the LocalServer.

The comparison with a clean run is sentence by sentence: the tone backend is deterministic,
so each sentence spoken on its own gives its exact samples S_i, and a clean run of the whole
text is their concatenation (checked). A run whose connection the server drops must then be
``clean[:P] + S_{k+1} + ... + S_n`` with ``P`` inside sentence ``k``: every sample before the
loss kept, the resumed part starting at a sentence boundary, no sentence twice.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks import ArraySink, WavSink
from tests.conftest import Enroll
from tts_stream import ConnectionLost, Engine, SpeechOptions, UsageError, Voice
from tts_stream.messages import VC_MODELS
from tts_stream.resume import Resumed, SentenceCutter, resume_point
from tts_stream.server import LocalServer

TIMEOUT = 30.0
MODEL = VC_MODELS[0]
TEXT = ("The first sentence is here. A second one follows it! Is this the third? "
        "And the fourth, which ends the text.")  # fmt: skip


def sentences(text: str) -> list[str]:
    """The appends the cutter makes of ``text`` pushed at once: one per sentence."""
    return [t for op, t in SentenceCutter().feed(text) if op == "append"]


# --- pure -------------------------------------------------------------------------------------


def test_cutter_commits_after_each_sentence_across_pieces() -> None:
    c = SentenceCutter()
    assert c.feed("Hello there. How") == [("append", "Hello there."), ("commit", ""),
                                          ("append", " How")]  # fmt: skip
    assert c.feed(" are you?") == [("append", " are you?")]  # held: the next piece decides
    assert c.feed(" Fine") == [("commit", ""), ("append", " Fine")]
    assert c.feed("3.5 is a number") == [("append", "3.5 is a number")]
    assert c.feed("。下一句") == [("append", "。"), ("commit", ""), ("append", "下一句")]
    assert c.feed("") == []


@given(st.lists(st.text(alphabet="ab .!?\n。", max_size=12), max_size=8))
def test_cutter_keeps_every_character_in_order(pieces: list[str]) -> None:
    c = SentenceCutter()
    ops = [op for piece in pieces for op in c.feed(piece)]
    assert "".join(t for op, t in ops if op == "append") == "".join(pieces)
    for i, (op, _) in enumerate(ops):
        if op == "commit":  # a commit always follows appended text
            assert i > 0 and ops[i - 1][0] == "append"


def test_resume_point() -> None:
    assert resume_point("Cut here. Next one.", running_heard=True) == len("Cut here.")
    assert resume_point("Cut here. Next one.", running_heard=False) == 0
    assert resume_point("no end yet", running_heard=True) == len("no end yet")
    assert resume_point("3.5 apples. Next", running_heard=True) == len("3.5 apples.")


# --- loopback ---------------------------------------------------------------------------------


@pytest.fixture
async def voice(server: LocalServer, enroll: Enroll) -> Voice:
    return Voice(await enroll(server), MODEL)


def engine_for(srv: LocalServer, **kwargs: Any) -> Engine:
    return Engine(base_url=srv.base_url, api_key=srv.api_key, pool_size=0, **kwargs)


def wav_samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


async def speak(engine: Engine, voice: Voice, pieces: list[str], **kwargs: Any) -> np.ndarray:
    arr = ArraySink(max_blocks=100_000)
    async with engine.speak(voice, sinks=[arr], **kwargs) as speech:
        for piece in pieces:
            await speech.push(piece)
    return await arr.read_all(within=TIMEOUT)


async def per_sentence(engine: Engine, voice: Voice, text: str) -> list[np.ndarray]:
    """Each sentence's samples, spoken on its own; their concatenation is a clean run."""
    alone = [await speak(engine, voice, [s]) for s in sentences(text)]
    clean = await speak(engine, voice, [text], on_loss="resume")
    assert np.array_equal(clean, np.concatenate(alone))
    return alone


def check_resumed(got: np.ndarray, alone: list[np.ndarray]) -> int:
    """``got`` is clean[:P] + the sentences after P's sentence; returns that sentence's index."""
    clean = np.concatenate(alone)
    ends = np.cumsum([a.size for a in alone])
    for k in range(len(alone)):
        tail = alone[k + 1 :]
        p = got.size - sum(a.size for a in tail)
        start = ends[k] - alone[k].size
        if start < p <= ends[k]:
            assert np.array_equal(got[:p], clean[:p]), "a sample before the loss changed"
            assert np.array_equal(got[p:], np.concatenate(tail) if tail else got[p:p])
            return k
    raise AssertionError("the resumed audio does not start at a sentence boundary")


@pytest.mark.parametrize(("fault", "code"), [
    ({"drop_after_deltas": 4}, 1006),
    ({"close_after_deltas": 4, "close_code": 1011}, 1011),
    ({"close_after_deltas": 9, "close_code": 1001}, 1001),
    ({"stall_after_deltas": 6}, None),  # silent but open: the stall watchdog calls it lost
])  # fmt: skip
async def test_resume_after_a_loss_keeps_the_audio_and_repeats_no_sentence(
    server: LocalServer, voice: Voice, tmp_path: Path, fault: dict[str, int], code: int | None
) -> None:
    events: list[Resumed] = []
    opts = SpeechOptions(on_loss="resume", on_resume=events.append, resume_backoff_s=0.01,
                         resume_stall_s=0.3)  # fmt: skip
    async with asyncio.timeout(TIMEOUT), engine_for(server, speech=opts) as engine:
        alone = await per_sentence(engine, voice, TEXT)
        server.faults.set(**fault, times=1)
        out = tmp_path / "resumed.wav"
        arr = ArraySink(max_blocks=100_000)
        async with engine.speak(voice, sinks=[arr, WavSink(out)]) as speech:
            await speech.push(TEXT)
        got = await arr.read_all(within=TIMEOUT)
        m = speech.metrics
    assert np.array_equal(wav_samples(out), got)
    k = check_resumed(got, alone)
    assert k < len(alone) - 1  # something was resumed
    (event,) = events
    assert speech.resumes == (event,)
    assert event.code == code and event.attempt == 1
    assert event.cut_text == sentences(TEXT)[k]
    assert event.resumed_text == "".join(sentences(TEXT)[k + 1 :])
    assert event.audio_ms > 0
    assert m.error is None and m.resumes == 1 and m.lost_chars == len(sentences(TEXT)[k])


async def test_resume_with_tokens_pushed_one_by_one(server: LocalServer, voice: Voice) -> None:
    tokens = [t for word in TEXT.split(" ") for t in (word, " ")][:-1]
    async with asyncio.timeout(TIMEOUT), engine_for(server) as engine:
        alone = await per_sentence(engine, voice, TEXT)
        clean_tokens = await speak(engine, voice, tokens, on_loss="resume")
        assert np.array_equal(clean_tokens, np.concatenate(alone))
        server.faults.set(drop_after_deltas=12, times=1)
        got = await speak(engine, voice, tokens, on_loss="resume",
                          options=SpeechOptions(resume_backoff_s=0.01))  # fmt: skip
        assert list(engine.history)[-1].resumes == 1
    check_resumed(got, alone)


async def test_resumes_are_bounded_then_the_loss_is_raised(
    server: LocalServer, voice: Voice
) -> None:
    opts = SpeechOptions(on_loss="resume", resume_attempts=2, resume_backoff_s=0.01)
    async with asyncio.timeout(TIMEOUT), engine_for(server, speech=opts) as engine:
        server.faults.set(drop_after_deltas=2, times=None)  # every session dies
        with pytest.raises(ConnectionLost) as info:
            await speak(engine, voice, [TEXT])
        assert info.value.audio_received is True
        m = list(engine.history)[-1]
    assert m.resumes == 2 and m.error is not None


async def test_default_still_fails_and_commit_mode_is_refused(
    server: LocalServer, voice: Voice
) -> None:
    async with asyncio.timeout(TIMEOUT), engine_for(server) as engine:
        server.faults.set(drop_after_deltas=4, times=1)
        with pytest.raises(ConnectionLost):
            await speak(engine, voice, [TEXT])  # default on_loss="fail": never repeats
        with pytest.raises(UsageError, match="server_commit"):
            engine.speak(voice, sinks=[ArraySink()], mode="commit", on_loss="resume")
