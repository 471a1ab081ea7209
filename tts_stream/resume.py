"""Resume after a lost connection: sentence cuts and the resume point (pure).

Role: with ``on_loss="resume"`` a :class:`~tts_stream.speech.Speech` commits each sentence on
its own (so every response is at most one sentence, whatever the server's own segmentation),
and when the session is lost *after audio* it continues on a fresh session from the first
sentence no audio was received for. Everything received before the loss stays in the sinks
and is played; the sentence the loss cut is not repeated and not finished: it is reported
(:class:`Resumed`, the metrics' ``resumes`` and ``lost_chars``).

* :class:`SentenceCutter` turns text pushed piece by piece (LLM tokens) into ``append`` and
  ``commit`` operations, committing after every sentence end. ``.``, ``!`` and ``?`` end a
  sentence only when whitespace follows (``3.5`` and ``e.g.`` inside a word are not cuts; a
  piece that ends on one is held until the next piece says); ``。！？`` and a newline always do.
* :func:`resume_point` says where in the unconsumed text the fresh session starts.

Boundary: PURE (no asyncio, no sockets, no clock).
"""

from __future__ import annotations

from dataclasses import dataclass

from .ledger import TextOp

__all__ = ["Resumed", "SentenceCutter", "resume_point", "sentence_end"]

_ALWAYS = frozenset("。！？\n")
_BEFORE_SPACE = frozenset(".!?")


def sentence_end(text: str, i: int) -> bool | None:
    """Whether a sentence ends after ``text[i]``: True, False, or None (the next char decides)."""
    ch = text[i]
    if ch in _ALWAYS:
        return True
    if ch not in _BEFORE_SPACE:
        return False
    if i + 1 >= len(text):
        return None
    return text[i + 1].isspace()


class SentenceCutter:
    """``append`` / ``commit`` operations that commit after every sentence of pushed text."""

    def __init__(self) -> None:
        self._held = False  # the last piece ended on "." "!" "?": a cut if whitespace follows

    def feed(self, text: str) -> list[TextOp]:
        """The operations for the next piece of text (commits only after appended text)."""
        ops: list[TextOp] = []
        if not text:
            return ops
        if self._held and text[0].isspace():
            ops.append(("commit", ""))
        self._held = False
        start = 0
        for i in range(len(text)):
            end = sentence_end(text, i)
            if end:
                ops.append(("append", text[start : i + 1]))
                ops.append(("commit", ""))
                start = i + 1
            elif end is None:
                self._held = True
        if start < len(text):
            ops.append(("append", text[start:]))
        return ops


def resume_point(pending: str, *, running_heard: bool) -> int:
    """Where a fresh session starts in ``pending`` (the text no completed response consumed).

    ``running_heard``: the response running at the loss had delivered audio. Its text starts
    ``pending`` and is at most one sentence (the cutter committed each one), so the fresh
    session starts after the first sentence end; with nothing heard, at the start. Text
    after the last sentence end (not yet committed) belongs to the running sentence too.
    """
    if not running_heard:
        return 0
    for i in range(len(pending)):
        if sentence_end(pending, i) is not False:  # None: the end of the text ends it too
            return i + 1
    return len(pending)


@dataclass(frozen=True)
class Resumed:
    """A speech resumed on a fresh session after its connection was lost after audio.

    ``audio_ms``: audio received before the loss (all of it kept, in every sink).
    ``cut_text``: the sentence the loss interrupted; part of it was heard, the rest is lost
    (it is neither finished nor repeated). ``resumed_text``: the text sent again on the
    fresh session; it starts at a sentence boundary. ``attempt`` counts from 1.
    """

    attempt: int
    code: int | None
    reason: str
    audio_ms: float
    cut_text: str
    resumed_text: str
