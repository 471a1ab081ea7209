"""The utterance ledger, with plain calls (pure tier): text accounting, replay, barge-in report."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_stream.ledger import Ledger, chars_for_billable, word_cut
from tts_stream.messages import billable_characters

RATE = 1000  # one sample per millisecond keeps the arithmetic readable


def speak_response(ledger: Ledger, rid: str, samples: int, consumed: str | None) -> None:
    """One whole response: created, its audio, done (billed for ``consumed``)."""
    ledger.response_started(rid)
    ledger.audio(samples)
    chars = None if consumed is None else billable_characters(consumed)
    ledger.response_finished(rid, chars)


def test_text_pushed_is_consumed_by_billed_characters() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Hello there. 你好")
    assert ledger.pending_chars == len("Hello there. 你好")
    speak_response(ledger, "r1", 800, "Hello there. ")
    assert ledger.pending_chars == 2
    speak_response(ledger, "r2", 400, "你好")  # Han characters bill twice (§5.12)
    assert ledger.pending_chars == 0


def test_without_usage_the_response_consumes_what_was_pending_at_its_start() -> None:
    ledger = Ledger(RATE)
    ledger.appended("One. ")
    ledger.response_started("r1")
    ledger.appended("Two. ")  # arrives while r1 runs: not r1's text
    ledger.audio(100)
    assert ledger.response_finished("r1", None) == "One. "
    assert ledger.pending_chars == len("Two. ")


def test_uncut_follows_our_commits_and_the_servers_cuts() -> None:
    ledger = Ledger(RATE)
    assert ledger.uncut == 0
    ledger.appended("Hi.")
    assert ledger.uncut == 3
    ledger.server_cut()  # input_text_buffer.committed in server_commit mode
    assert ledger.uncut == 0
    ledger.appended(" More")
    ledger.committed()
    assert ledger.uncut == 0 and ledger.committed_once


def test_replay_log_holds_every_event_until_audio_reaches_a_sink() -> None:
    ledger = Ledger(RATE)
    ledger.appended("a")
    ledger.committed()
    ledger.appended("b")
    ledger.finishing()
    assert ledger.replayable
    assert ledger.replay() == [("append", "a"), ("commit", ""), ("append", "b"), ("finish", "")]
    assert ledger.pending_chars == 0 and ledger.uncut == 0  # resent through the ledger again


def test_no_replay_after_audio() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Hello.")
    ledger.response_started("r1")
    ledger.audio(10)
    assert not ledger.replayable
    ledger.appended(" more")  # not logged: it can never be replayed
    with pytest.raises(ValueError, match="must not be replayed"):
        ledger.replay()


def test_report_cuts_the_running_response_at_a_word() -> None:
    ledger = Ledger(RATE)
    ledger.appended("First sentence. Second one here.")
    speak_response(ledger, "r1", 1000, "First sentence. ")  # 16 chars per 1000 ms
    ledger.response_started("r2")
    ledger.audio(1000)
    # 500 ms of r2 heard at the learned 16 chars/s: 8 chars, moved back to a word start.
    report = ledger.report({"wav": 1500})
    assert report.spoken_text == "First sentence. Second "
    assert report.unspoken_text == "one here."
    assert report.played_ms == {"wav": 1500.0}
    assert report.dropped_responses == 1


def test_report_after_an_interrupt_starts_afresh() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Old words. ")
    speak_response(ledger, "r1", 500, "Old words. ")
    ledger.report({"s": 500})
    ledger.interrupted()
    ledger.appended("New words.")
    report = ledger.report({"s": 500})
    assert report.spoken_text + report.unspoken_text == "New words."
    assert ledger.replayable


def test_forgive_unbilled_counts_pending_as_spoken() -> None:
    ledger = Ledger(RATE)
    ledger.appended("abc")
    assert ledger.forgive_unbilled() == 3
    assert ledger.pending_chars == 0
    assert ledger.report({}).spoken_text == "abc"


def test_word_cut_moves_back_to_the_word_start() -> None:
    assert word_cut("hello world", 8) == 6
    assert word_cut("hello world", 0) == 0
    assert word_cut("hello world", 99) == 11
    assert word_cut("helloworld", 5) == 5  # no space: cut where asked


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab 你好,。", max_size=30), st.data())
def test_chars_for_billable_inverts_the_billing_rule(text: str, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(text)))
    assert chars_for_billable(text, billable_characters(text[:k])) == k


# --- properties over random utterances ---------------------------------------------------

TEXT = st.text(alphabet="ab c.你,", min_size=1, max_size=12)
STEP = st.one_of(
    st.tuples(st.just("append"), TEXT),
    st.tuples(st.just("commit"), st.just("")),
    st.tuples(st.just("cut"), st.just("")),
    # a whole response: how many samples, and how much of the pending text it consumed
    st.tuples(st.just("response"), st.tuples(st.integers(0, 3000), st.floats(0, 1))),
    st.tuples(st.just("lost"), st.just("")),  # a session lost: replay if still allowed
    st.tuples(st.just("interrupt"), st.floats(0, 1)),
)


def _respond(ledger: Ledger, pending: str, rid: str, samples: int, share: float) -> tuple[str, int]:
    """A whole response of ``samples`` consuming ``share`` of ``pending``: (text, billed)."""
    take = pending[: int(len(pending) * share)]
    ledger.response_started(rid)
    if samples:
        ledger.audio(samples)
    chars = billable_characters(take)
    return ledger.response_finished(rid, chars), chars


def _replay(ledger: Ledger) -> str:
    """Resend the replay log through the ledger, as the speech does; the text appended."""
    replayed = ""
    for kind, text in ledger.replay():
        if kind == "append":
            ledger.appended(text)
            replayed += text
        elif kind == "commit":
            ledger.committed()
        else:
            ledger.finishing()
    return replayed


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_ledger_invariants(steps: list[tuple[str, object]]) -> None:
    ledger = Ledger(RATE)
    pushed = ""  # text pushed since the start or the last interrupt
    heard_samples = 0  # samples delivered since the start or the last interrupt
    billed = 0
    consumed = ""
    for i, (op, arg) in enumerate(steps):
        if op == "append":
            assert isinstance(arg, str)
            ledger.appended(arg)
            pushed += arg
        elif op == "commit":
            ledger.committed()
        elif op == "cut":
            ledger.server_cut()
        elif op == "response":
            assert isinstance(arg, tuple)
            samples, share = arg
            text, chars = _respond(ledger, pushed[len(consumed):], f"r{i}", samples, share)
            consumed += text
            billed += chars
            heard_samples += samples
        elif op == "lost":
            if ledger.replayable:
                consumed, billed = "", 0
                assert _replay(ledger) == pushed  # everything since the start, nothing more
        else:
            assert isinstance(arg, float)
            report = ledger.report({"sink": int(heard_samples * arg)})
            # The report accounts for exactly the text pushed, spoken first.
            assert report.spoken_text + report.unspoken_text == pushed
            ledger.interrupted()
            pushed, consumed, billed, heard_samples = "", "", 0, 0
        # Never both replayable and heard.
        assert not (ledger.replayable and heard_samples > 0)
        # Consumed text follows the server's billing exactly.
        assert billable_characters(consumed) == billed
        assert ledger.pending_chars == len(pushed) - len(consumed)
    report = ledger.report({"sink": heard_samples})
    assert pushed.startswith(report.spoken_text)
    assert report.spoken_text + report.unspoken_text == pushed
