"""The utterance ledger, with plain calls (pure tier): text accounting, replay, barge-in report."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
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


# --- commit without noise (issue 11) -----------------------------------------------------


def test_a_commit_overtaken_by_the_servers_cut_is_recognised_once() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Hi.")
    ledger.committed()  # on the wire while the server cuts at the period on its own
    ledger.server_cut()  # that cut, not our commit's answer...
    assert not ledger.commit_overtaken("InternalError")  # another error stays an error
    assert ledger.commit_overtaken("invalid_value")  # ...so "buffer is empty" answers ours
    assert not ledger.commit_overtaken("invalid_value")  # once per commit


def test_the_empty_commit_answer_may_come_before_the_servers_cut() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Hi.")
    ledger.committed()
    assert ledger.commit_overtaken("invalid_value")  # the server announces its cut later
    ledger.server_cut()
    assert ledger.uncut == 0
    assert not ledger.commit_overtaken("invalid_value")


def test_in_commit_mode_every_cut_answers_a_commit_of_ours() -> None:
    ledger = Ledger(RATE, server_cuts=False)
    ledger.appended("Hi.")
    ledger.committed()
    ledger.server_cut()
    assert not ledger.commit_overtaken("invalid_value")


def test_a_server_cut_without_a_commit_of_ours_excuses_nothing() -> None:
    ledger = Ledger(RATE)
    ledger.appended("Hi.")
    ledger.server_cut()
    assert ledger.uncut == 0  # commit() now sends nothing
    assert not ledger.commit_overtaken("invalid_value")


# A server_commit server that cuts at "." on its own and announces each cut (ours or its own)
# some time later, while an error answers at once; one FIFO wire each way. Hypothesis picks
# who moves next, so every interleaving of the race is tried.
CLIENT = st.lists(st.one_of(st.tuples(st.just("push"), st.sampled_from(["a", "b.", " c."])),
                            st.tuples(st.just("commit"), st.just(""))), max_size=12)  # fmt: skip


class _Wire:
    def __init__(self, actions: list[tuple[str, str]]) -> None:
        self.ledger = Ledger(RATE)
        self.todo = list(actions)
        self.to_server: list[tuple[str, str]] = []
        self.cuts = 0  # cuts made, not yet announced
        self.to_client: list[str] = []
        self.buffered = ""
        self.errors = self.recognised = 0

    def client_acts(self) -> None:
        kind, text = self.todo.pop(0)
        if kind == "push":
            self.ledger.appended(text)
            self.to_server.append(("append", text))
        elif self.ledger.uncut > 0:  # what Speech.commit() does
            self.ledger.committed()
            self.to_server.append(("commit", ""))

    def server_reads(self) -> None:
        kind, text = self.to_server.pop(0)
        self.buffered += text
        if kind == "commit" and not self.buffered:
            self.to_client.append("error")
        elif self.buffered and (kind == "commit" or self.buffered.endswith(".")):
            self.buffered = ""
            self.cuts += 1

    def server_announces(self) -> None:
        self.cuts -= 1
        self.to_client.append("committed")

    def client_reads(self) -> None:
        if self.to_client.pop(0) == "committed":
            self.ledger.server_cut()
        else:
            self.errors += 1
            self.recognised += self.ledger.commit_overtaken("invalid_value")

    def step(self, choice: int) -> bool:
        moves: list[tuple[object, Callable[[], None]]] = [
            (self.todo, self.client_acts),
            (self.to_server, self.server_reads),
            (self.cuts, self.server_announces),
            (self.to_client, self.client_reads),
        ]
        possible = [act for ready, act in moves[choice:] + moves[:choice] if ready]
        if possible:
            possible[0]()
        return bool(possible)


@settings(max_examples=400, deadline=None)
@given(CLIENT, st.lists(st.integers(0, 3), max_size=80))
def test_every_empty_commit_answer_is_recognised_as_the_race(
    actions: list[tuple[str, str]], choices: list[int]
) -> None:
    wire = _Wire(actions)
    while wire.step(choices.pop() if choices else 0):
        pass
    assert wire.recognised == wire.errors  # no empty-commit answer is shown as a server error
    assert wire.ledger.uncut == 0 or wire.buffered  # what the server holds, the ledger knows
    event(f"races: {min(wire.errors, 2)}")


def test_resume_from_closes_the_lost_response_at_the_resume_point() -> None:
    ledger = Ledger(RATE)
    ledger.appended("One. Two. ")
    ledger.response_started("r1")
    assert not ledger.running_heard
    ledger.audio(300)
    assert ledger.running_heard
    assert ledger.resume_from(5) == ("One. ", "Two. ")
    assert ledger.pending_chars == 0 and ledger.uncut == 0 and not ledger.running_heard
    ledger.appended("Two. ")  # the fresh session sends the rest again
    report = ledger.report({"s": 300})
    assert report.spoken_text + report.unspoken_text == "One. Two. "
