"""The client session state machine, with plain function calls (no event loop, no sockets)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_stream import messages as m
from tts_stream import protocol as p
from tts_stream.errors import UsageError

CONFIG = {"voice": "qwen-tts-vc-x-voice-1", "mode": "server_commit", "sample_rate": 24000}


def ev(type_: str, **fields: Any) -> m.ServerEvent:
    return m.parse_server_event(orjson.dumps({"type": type_, "event_id": "event_1", **fields}))


def state(s: p.ClientSession) -> p.State:
    return s.state


def created() -> m.ServerEvent:
    return ev("session.created", session={"id": "sess_1", "mode": "server_commit"})


def updated() -> m.ServerEvent:
    return ev("session.updated", session={"id": "sess_1", **CONFIG})


def resp_created(rid: str = "resp_1") -> m.ServerEvent:
    return ev("response.created", response={"id": rid, "status": "in_progress"})


def delta(rid: str | None = "resp_1", data: str = "AAAA") -> m.ServerEvent:
    fields: dict[str, Any] = {"delta": data}
    if rid is not None:
        fields["response_id"] = rid
    return ev("response.audio.delta", **fields)


def resp_done(rid: str = "resp_1", chars: int | None = 5) -> m.ServerEvent:
    usage = {"characters": chars} if chars is not None else {}
    return ev("response.done", response={"id": rid, "status": "completed", "usage": usage})


def ready() -> p.ClientSession:
    s = p.ClientSession(config=CONFIG)
    s.receive(created())
    s.update()
    assert s.receive(updated()) == [p.Configured(updated().session)]  # type: ignore[attr-defined]
    return s


def test_happy_path_states_and_notifications() -> None:
    s = p.ClientSession(config=CONFIG)
    assert state(s) is p.State.CONNECTING
    assert isinstance(s.receive(created())[0], p.Created)
    assert state(s) is p.State.CREATED and s.session_id == "sess_1"
    upd = s.update()
    assert isinstance(upd, m.SessionUpdate) and upd.session["voice"] == CONFIG["voice"]
    assert upd.event_id.startswith("event_") and len(upd.event_id) == 6 + 32
    assert state(s) is p.State.CONFIGURING
    assert isinstance(s.receive(updated())[0], p.Configured)
    assert state(s) is p.State.READY
    assert isinstance(s.append("Hello."), m.InputTextBufferAppend)
    assert state(s) is p.State.STREAMING
    assert isinstance(s.commit(), m.InputTextBufferCommit)
    assert s.receive(ev("input_text_buffer.committed", item_id="")) == [p.BufferCommitted()]
    assert s.receive(resp_created()) == [p.ResponseStarted("resp_1")]
    assert s.response_active
    for t in ("response.output_item.added", "response.content_part.added"):
        assert isinstance(s.receive(ev(t, response_id="resp_1"))[0], p.Ignored)
    (note,) = s.receive(delta())
    assert isinstance(note, p.AudioReceived) and note.response_id == "resp_1"
    assert note.delta == "AAAA"
    assert s.receive(resp_done()) == [p.ResponseFinished("resp_1", "completed", 5)]
    assert not s.response_active and s.billed_characters == 5
    assert isinstance(s.finish(), m.SessionFinish)
    assert state(s) is p.State.FINISHING
    assert s.receive(ev("session.finished")) == [p.SessionComplete()]
    assert state(s) is p.State.FINISHED and s.complete
    assert s.connection_closed(1000) == []
    assert state(s) is p.State.CLOSED and s.complete


def test_update_before_session_created_is_legal() -> None:
    # §5.2 step 3: session.update may go out before session.created was read.
    s = p.ClientSession(config=CONFIG)
    s.update()
    s.receive(created())  # arrives after the update: must not reset CONFIGURING
    assert state(s) is p.State.CONFIGURING
    s.receive(updated())
    assert state(s) is p.State.READY


@pytest.mark.parametrize(
    ("call", "state_name"),
    [("append", "CONNECTING"), ("commit", "CONNECTING"), ("finish", "CONFIGURING")],
)
def test_illegal_calls_name_the_state(call: str, state_name: str) -> None:
    s = p.ClientSession(config=CONFIG)
    if state_name == "CONFIGURING":
        s.update()
    with pytest.raises(UsageError, match=state_name):
        getattr(s, call)("x") if call == "append" else getattr(s, call)()


def test_commit_needs_text_and_update_only_once() -> None:
    s = ready()
    with pytest.raises(UsageError, match="READY"):
        s.commit()
    with pytest.raises(UsageError, match="READY"):
        s.update()
    s.append("a")
    s.finish()
    with pytest.raises(UsageError, match="FINISHING"):
        s.append("more")


def test_missing_committed_unknown_events_and_missing_ids_are_tolerated() -> None:
    s = ready()
    s.append("Hi.")
    assert isinstance(s.receive(ev("response.something_new", foo=1))[0], p.Ignored)
    # no input_text_buffer.committed, no response.created, delta without response_id
    (note,) = s.receive(delta(rid=None))
    assert isinstance(note, p.AudioReceived) and note.response_id
    rid = note.response_id
    (note2,) = s.receive(delta(rid=None))
    assert isinstance(note2, p.AudioReceived) and note2.response_id == rid
    # response.done without id and without usage
    done = ev("response.done", response={"status": "completed"})
    (fin,) = s.receive(done)
    assert isinstance(fin, p.ResponseFinished) and fin.response_id == rid
    assert fin.characters is None


def test_retired_response_deltas_are_dropped() -> None:
    s = ready()
    s.append("Hello there.")
    s.receive(resp_created("resp_a"))
    assert isinstance(s.receive(delta("resp_a"))[0], p.AudioReceived)
    assert s.retire_current() == "resp_a"
    (late,) = s.receive(delta("resp_a"))
    assert isinstance(late, p.Ignored) and "retired" in late.why
    assert isinstance(s.receive(resp_done("resp_a"))[0], p.Ignored)
    s.receive(resp_created("resp_b"))
    assert isinstance(s.receive(delta("resp_b"))[0], p.AudioReceived)
    assert s.deltas == 2


def test_recoverable_error_keeps_the_session_fatal_error_fails_it() -> None:
    s = ready()
    s.append("x")
    soft = ev("error", error={"type": "invalid_request_error", "code": "invalid_value",
                              "message": "Input text buffer is empty."})  # fmt: skip
    (note,) = s.receive(soft)
    assert isinstance(note, p.ServerFailure) and not note.fatal
    assert state(s) is p.State.STREAMING
    hard = ev("error", error={"code": "InternalError", "message": "boom"})
    (note,) = s.receive(hard)
    assert isinstance(note, p.ServerFailure) and note.fatal and note.code == "InternalError"
    assert state(s) is p.State.FAILED and s.error == note
    lost = s.connection_closed(1011, "x")
    assert isinstance(lost[0], p.SessionLost)


def test_error_refusing_the_configuration_is_fatal() -> None:
    s = p.ClientSession(config=CONFIG)
    s.update()
    bad = ev("error", error={"type": "invalid_request_error", "code": "invalid_value",
                             "message": "The requested voice 'v' is not supported."})  # fmt: skip
    (note,) = s.receive(bad)
    assert isinstance(note, p.ServerFailure) and note.fatal
    assert state(s) is p.State.FAILED


def test_close_before_finished_is_a_loss() -> None:
    s = ready()
    s.append("x")
    s.finish()
    (lost,) = s.connection_closed(1006, "dropped")
    assert lost == p.SessionLost(1006, "dropped", after_finish=True)
    assert not s.complete
    # nothing is delivered after the close
    assert isinstance(s.receive(delta())[0], p.Ignored)


# --- event-order fuzzing ------------------------------------------------------------------------

SERVER_EVENTS = [
    created(), updated(), resp_created("resp_1"), resp_created("resp_2"), delta("resp_1"),
    delta("resp_2"), delta(None), resp_done("resp_1"), resp_done("resp_2", None),
    ev("input_text_buffer.committed"), ev("input_text_buffer.cleared"),
    ev("response.audio.done", response_id="resp_1"), ev("session.finished"),
    ev("error", error={"type": "invalid_request_error", "code": "c", "message": "m"}),
    ev("error", error={"code": "InternalError", "message": "m"}), ev("whatever.new"),
]  # fmt: skip
CLIENT_CALLS = ["update", "append", "commit", "clear", "finish", "retire", "close"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SERVER_EVENTS), st.sampled_from(CLIENT_CALLS)),
                max_size=40))  # fmt: skip
def test_any_event_order_keeps_invariants(steps: list[Any]) -> None:
    s = p.ClientSession(config=CONFIG)
    audio = 0
    for step in steps:
        before = s.state
        if isinstance(step, str):
            try:
                if step == "append":
                    s.append("t")
                elif step == "retire":
                    s.retire_current()
                elif step == "close":
                    s.connection_closed(1000)
                else:
                    getattr(s, step)()
            except UsageError as exc:
                assert before.name in str(exc)  # illegal calls name the state ...
                assert state(s) is before  # ... and change nothing
            continue
        for note in s.receive(step):
            assert isinstance(note, p.Notification)
            if isinstance(note, p.AudioReceived):
                audio += 1
                assert before in (p.State.CONNECTING, p.State.CREATED, p.State.CONFIGURING,
                                  p.State.READY, p.State.STREAMING, p.State.FINISHING)  # fmt: skip
                assert not s.is_retired(note.response_id)
        # terminal states are sticky
        if before in (p.State.FINISHED, p.State.FAILED):
            assert state(s) in (before, p.State.CLOSED)
        if before is p.State.CLOSED:
            assert state(s) is p.State.CLOSED
    assert s.deltas == audio
