"""The utterance ledger: pure text and audio accounting of one :class:`~tts_stream.speech.Speech`.

Role: everything a speech must *know* about its text, kept apart from everything it must
*do* (the pool, the pump, the fan-out, in :mod:`.speech`). The ledger records, as plain
method calls:

* the text pushed (``appended``), our commits (``committed``) and the server's own cuts in
  ``server_commit`` mode (``server_cut``, from ``input_text_buffer.committed``), so
  :attr:`Ledger.uncut` says whether a ``commit`` would find text (protocol.md §5.6: a commit
  of an empty buffer is an error). One race remains: the server cuts while our commit is on
  the wire, and answers it with an ``error``; :meth:`Ledger.commit_overtaken` recognises
  that answer (a commit of ours followed by a server cut), so it is not a server error;
* each response: its start, the audio it delivered (utterance sample offsets) and, when it
  is done, the text it consumed, from its billed ``usage.characters`` (§5.12);
* the **replay log**: every text event sent, valid until the first sample reached a sink;
  a retry replays it on a fresh session, after that it is gone (speech never repeats);
* the **barge-in report** (:class:`InterruptReport`) as a function of what each sink played;
* a **resume** after a loss (``on_loss="resume"``): :meth:`Ledger.resume_from` closes the
  lost session's accounts at the resume point (:func:`tts_stream.resume.resume_point`).

Invariants (property-tested in ``tests/test_ledger.py``): once audio was delivered the
replay log is empty, so no text is both replayable and heard; ``spoken_text +
unspoken_text`` of a report is the text pushed since the start (or the last interrupt), so
the spoken part is a prefix of it; characters consumed follow the server's billing.

Boundary: PURE. No asyncio, no sockets, no clock (no time is needed at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .messages import billable_characters

__all__ = ["InterruptReport", "Ledger", "TextOp", "chars_for_billable", "word_cut"]

TextOp = tuple[Literal["append", "commit", "finish"], str]

# Only recent segments matter for a barge-in report: older ones were played long ago.
_KEPT_SEGMENTS = 64
CHARS_PER_SECOND = 15.0  # typical speaking rate, used until a response tells the real one
CLAUSE_END = frozenset(",;:!?.\n，、；：。！？")


@dataclass(frozen=True)
class InterruptReport:
    """What :meth:`Speech.interrupt` stopped.

    ``played_ms``: per sink, the audio that actually left it (``Sink.interrupt()``), over the
    whole speech. ``spoken_text`` is an *approximation* of what the listener heard (by the
    sink that played the most): the committed text of every completed response whose audio
    was fully played, plus the part in progress, cut at a word boundary. The server never
    says which text a sample belongs to: a completed response's text is known from its
    billed ``usage.characters``, and the cut inside it is proportional to the share of its
    audio played; for the response still running, the cut is the played audio times the
    speaking rate (characters per second) of this speech's completed responses, or 15
    chars/s before any. ``unspoken_text`` is the rest of the text pushed, so
    ``spoken_text + unspoken_text`` is the text since the start (or the last interrupt).
    """

    played_ms: Mapping[str, float]
    spoken_text: str
    unspoken_text: str
    dropped_responses: int


@dataclass
class _Segment:
    """A response's place in the utterance: its audio range and (once known) its text."""

    response_id: str
    start: int  # first sample (utterance offset)
    end: int  # one past the last sample received
    text: str | None = None  # None while running


def chars_for_billable(text: str, billable: int) -> int:
    """How many leading characters of ``text`` make ``billable`` billed characters (§5.12)."""
    total = 0
    for i, ch in enumerate(text):
        if total >= billable:
            return i
        total += billable_characters(ch)
    return len(text)


def word_cut(text: str, i: int) -> int:
    """Move a cut index back to the start of the word it falls in."""
    if i <= 0 or i >= len(text):
        return max(0, min(i, len(text)))
    j = text.rfind(" ", 0, i + 1)
    return j + 1 if j >= 0 else i


class Ledger:
    """The text and audio accounting of one speech (see the module docstring)."""

    def __init__(self, sample_rate: int, *, server_cuts: bool = True) -> None:
        self.sample_rate = sample_rate
        # server_commit mode: the server cuts on its own, so a commit of ours can be overtaken.
        self.server_cuts = server_cuts
        self._spoken: list[str] = []  # text of completed responses, in order
        self._pending = ""  # pushed text no completed response has consumed yet
        self._uncut = 0  # chars appended since the last cut (our commit or the server's)
        self._ops: list[TextOp] = []  # text events of this session, for a replay
        self._committed_once = False
        self._commits_unanswered = 0  # our commits sent, no input_text_buffer.committed yet
        self._overtaken = 0  # ...answered by a server cut instead: an error may follow
        self._segments: list[_Segment] = []
        self._created_mark = 0  # len(_pending) when the running response started
        self.samples_out = 0  # samples delivered to the fan-out, over the whole speech
        self.audio_delivered = False  # audio of the current session reached the fan-out

    # --- text ------------------------------------------------------------------------------

    @property
    def pending_chars(self) -> int:
        """Text pushed that no completed response has consumed yet."""
        return len(self._pending)

    @property
    def pending_text(self) -> str:
        """The text pushed that no completed response has consumed yet."""
        return self._pending

    @property
    def uncut(self) -> int:
        """Characters sent since the last cut: a ``commit`` now would find this much text."""
        return self._uncut

    @property
    def committed_once(self) -> bool:
        """Whether this session saw a commit of ours (``first_commit="clause"`` needs one)."""
        return self._committed_once

    def appended(self, text: str) -> None:
        """``input_text_buffer.append`` of ``text`` was sent."""
        self._pending += text
        self._uncut += len(text)
        self._log(("append", text))

    def committed(self) -> None:
        """Our ``input_text_buffer.commit`` was sent."""
        self._uncut = 0
        self._committed_once = True
        self._commits_unanswered += 1
        self._log(("commit", ""))

    def finishing(self) -> None:
        """``session.finish`` was sent (or, on a dead session, is due in the replay)."""
        self._log(("finish", ""))

    def server_cut(self) -> None:
        """``input_text_buffer.committed``: the server cut everything sent so far.

        With a commit of ours unanswered, this is its answer, or (``server_commit`` mode)
        the server's own cut that overtook it: then our commit finds an empty buffer and
        its ``error`` answer follows.
        """
        self._uncut = 0
        if self._commits_unanswered:
            self._commits_unanswered -= 1
            if self.server_cuts:
                self._overtaken += 1

    def commit_overtaken(self, code: str) -> bool:
        """Whether a recoverable ``error`` of ``code`` answers a commit the server's own cut
        overtook (the buffer was empty when it arrived): the race, not a server error.

        ``server_commit`` mode only, once per commit of ours, and only for ``invalid_value``
        (the documented code of an empty commit's error, protocol.md §5.7 C; the message is
        not a contract). The server may announce its cut before or after that error, so
        both orders count: the error answers a commit still unanswered, or one whose
        ``committed`` may have been the server's cut.
        """
        if not self.server_cuts or code != "invalid_value":
            return False
        if self._commits_unanswered:
            self._commits_unanswered -= 1
            return True
        if self._overtaken:
            self._overtaken -= 1
            return True
        return False

    def _new_session(self) -> None:
        """Per-session counts start over (a retry, a resume, after a barge-in)."""
        self._uncut = 0
        self._commits_unanswered = 0
        self._overtaken = 0

    def _log(self, op: TextOp) -> None:
        if not self.audio_delivered:
            self._ops.append(op)  # replayable until audio reached a sink

    # --- responses and audio -------------------------------------------------------------

    def response_started(self, response_id: str) -> bool:
        """A response began (``response.created`` or its first delta); False if known."""
        if self._segments and self._segments[-1].response_id == response_id:
            return False
        self._segments.append(_Segment(response_id, self.samples_out, self.samples_out))
        self._created_mark = len(self._pending)
        if len(self._segments) > _KEPT_SEGMENTS:
            del self._segments[:-_KEPT_SEGMENTS]
        return True

    def audio(self, n: int) -> int:
        """``n`` samples of the running response go to the sinks; returns their offset.

        From now on nothing is replayable: the replay log is dropped.
        """
        offset = self.samples_out
        self._segments[-1].end += n
        self.samples_out += n
        self.audio_delivered = True
        if self._ops:
            self._ops.clear()
        return offset

    def response_finished(self, response_id: str, characters: int | None) -> str:
        """``response.done``: the text the response consumed (by its billed characters)."""
        if characters is not None:
            n = chars_for_billable(self._pending, characters)
        else:
            n = self._created_mark
        text, self._pending = self._pending[:n], self._pending[n:]
        self._created_mark = 0
        self._spoken.append(text)
        for seg in reversed(self._segments):
            if seg.response_id == response_id:
                seg.text = text
                break
        return text

    def forgive_unbilled(self) -> int:
        """The server cut all our text and is idle, yet text is pending: count it spoken.

        Billed characters did not match the text (§5.12 is a documented rule, not a
        contract): trust the server over the count. Returns the characters forgiven.
        """
        n = len(self._pending)
        self._spoken.append(self._pending)
        self._pending, self._created_mark = "", 0
        return n

    # --- retry and barge-in --------------------------------------------------------------

    @property
    def replayable(self) -> bool:
        """Whether a lost session can be replayed on a fresh one (no audio delivered)."""
        return not self.audio_delivered

    def replay(self) -> list[TextOp]:
        """Start over on a fresh session: the text events to send again, in order.

        Only valid while :attr:`replayable`; the audio of the lost session never reached a
        sink, so its responses are forgotten. The ledger starts empty: the caller sends the
        events again and records them with ``appended`` / ``committed`` / ``finishing``.
        """
        if self.audio_delivered:
            raise ValueError("audio reached a sink: the text must not be replayed")
        ops, self._ops = self._ops, []
        self._spoken = []  # responses of the lost session were never heard
        self._segments = []
        self._pending = ""
        self._created_mark = 0
        self._committed_once = False
        self._new_session()
        return ops

    def report(self, played: Mapping[str, int]) -> InterruptReport:
        """The barge-in report, given the samples each sink played (see InterruptReport)."""
        heard = max(played.values(), default=0)
        spoken: list[str] = []
        unspoken: list[str] = []
        # Completed responses older than the segments kept are long played: all spoken.
        kept_done = sum(1 for seg in self._segments if seg.text is not None)
        spoken.extend(self._spoken[: max(len(self._spoken) - kept_done, 0)])
        cps = self._chars_per_second()
        running = self._pending[: self._created_mark]
        cut_short = 0
        for seg in self._segments:
            if seg.text is not None:
                text = seg.text
                if seg.end <= heard:
                    spoken.append(text)
                    continue
                frac = (heard - seg.start) / max(seg.end - seg.start, 1)
                n = int(len(text) * min(max(frac, 0.0), 1.0))
            else:
                text = running
                n = int(max(heard - seg.start, 0) / self.sample_rate * cps)
            cut = word_cut(text, min(n, len(text)))
            spoken.append(text[:cut])
            unspoken.append(text[cut:])
            cut_short += 1
        running_open = bool(self._segments) and self._segments[-1].text is None
        unspoken.append(self._pending[len(running) if running_open else 0 :])
        return InterruptReport(
            played_ms={name: n * 1000.0 / self.sample_rate for name, n in played.items()},
            spoken_text="".join(spoken),
            unspoken_text="".join(unspoken),
            dropped_responses=cut_short,
        )

    def _chars_per_second(self) -> float:
        """Speaking rate, to place the cut inside the running response (whose text the
        server never tells): learned from completed responses, else ~15 chars/s."""
        done = [seg for seg in self._segments if seg.text is not None and seg.end > seg.start]
        done_chars = sum(len(seg.text or "") for seg in done)
        done_s = sum(seg.end - seg.start for seg in done) / self.sample_rate
        return done_chars / done_s if done_chars and done_s else CHARS_PER_SECOND

    def interrupted(self) -> None:
        """After a barge-in: what was not heard is gone; the next text starts afresh."""
        self._spoken = []
        self._pending = ""
        self._ops.clear()
        self._segments = []
        self._created_mark = 0
        self._committed_once = False
        self.audio_delivered = False
        self._new_session()

    # --- resume ----------------------------------------------------------------------------

    @property
    def running_heard(self) -> bool:
        """A response is running and has delivered audio (its text is partly heard)."""
        seg = self._segments[-1] if self._segments else None
        return seg is not None and seg.text is None and seg.end > seg.start

    def resume_from(self, skip: int) -> tuple[str, str]:
        """The session was lost after audio; a fresh one continues from ``pending[skip:]``.

        The first ``skip`` characters were consumed by the lost response (the part of them
        not heard is never said): they count as its text. Returns ``(cut, rest)``; the rest
        is to be sent again and recorded with ``appended`` like new text.
        """
        cut, rest = self._pending[:skip], self._pending[skip:]
        running = self._segments[-1] if self._segments else None
        if running is not None and running.text is None:
            running.text = cut
        self._spoken.append(cut)
        self._pending, self._created_mark = "", 0
        self._new_session()
        return cut, rest
