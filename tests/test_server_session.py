"""The local server's session rules (server/session.py), with plain calls: no loop, no socket.

The error texts quoted here are protocol.md's (§5.4, §5.7 C, §5.9) where it documents them;
the rest are the local server's choices listed in ``server/realtime.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_stream import messages as m
from tts_stream import protocol as p
from tts_stream.server.session import (
    Close,
    DeltaFrames,
    Failure,
    Finish,
    Ids,
    LookUpVoice,
    Output,
    RealtimeConfig,
    ServerSession,
    SessionState,
    StopAudio,
    Synthesize,
    check_setting,
)

MODEL = m.VC_MODELS[0]
NAME = "qwen-tts-vc-guanyu-voice-20260115103000123-a1b2"


@dataclass(frozen=True)
class Voice:
    """A stored voice as far as the machine reads it (voices.StoredVoice is the real one)."""

    name: str
    target_model: str = MODEL


Machine = ServerSession[Voice]


def machine(**config: Any) -> Machine:
    return ServerSession(model=MODEL, config=RealtimeConfig(**config), ids=Ids(b"s" * 13, 0))


def client(type_: str, **fields: Any) -> m.ClientEvent | m.UnknownEvent:
    return m.parse_client_event(orjson.dumps({"type": type_, "event_id": f"ev_{type_}", **fields}))


def update(s: Machine, found: Voice | None = None, **settings: Any) -> list[Output]:
    """``session.update``, answering the voice look-up with ``found``."""
    out = s.receive(client("session.update", session=settings), 0.0)
    if out and isinstance(out[-1], LookUpVoice):
        assert out == [LookUpVoice(settings["voice"])]
        return s.voice_found(found)
    return out


def ready(mode: str = "server_commit", **config: Any) -> Machine:
    s = machine(**config)
    (done,) = update(s, Voice(NAME), voice=NAME, mode=mode)
    assert isinstance(done, m.SessionUpdated)
    return s


def append(s: Machine, text: str, now: float = 0.0) -> list[Output]:
    return s.receive(client("input_text_buffer.append", text=text), now)


def texts(out: list[Output]) -> list[str]:
    return [o.text for o in out if isinstance(o, Synthesize)]


def only_error(out: list[Output]) -> dict[str, Any]:
    assert len(out) == 1 and isinstance(out[0], m.Error), out
    return out[0].error


# --- session.created / session.update -------------------------------------------------------------


def test_created_shows_the_defaults() -> None:
    s = machine()
    ev = s.created()
    assert isinstance(ev, m.SessionCreated) and ev.event_id.startswith("event_")
    assert ev.session == {
        "object": "realtime.session", "mode": "server_commit", "model": MODEL,
        "voice": "Cherry", "response_format": "pcm", "sample_rate": 24000, "id": s.session_id,
    }  # fmt: skip
    assert s.session_id.startswith("sess_") and len(s.session_id) == 5 + 21
    assert s.model_known
    assert not ServerSession(model="qwen-tts", config=RealtimeConfig()).model_known


def test_update_is_partial_atomic_and_echoes_every_key_set() -> None:
    s = ready()
    (ev,) = update(s, volume=80, enable_tn=True, language_type="english")
    assert isinstance(ev, m.SessionUpdated)
    assert ev.session == {
        "id": s.session_id, "object": "realtime.session", "model": MODEL, "voice": NAME,
        "language_type": "English", "mode": "server_commit", "response_format": "pcm",
        "sample_rate": 24000, "volume": 80, "enable_tn": True,
    }  # fmt: skip
    err = only_error(update(s, sample_rate=16000, volume=101))
    assert err["param"] == "session.volume" and s.settings["sample_rate"] == 24000
    (ev,) = update(s, model="whatever")  # some clients send it; the URL's model rules
    assert isinstance(ev, m.SessionUpdated) and "model" not in s.settings


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "auto",
         "Invalid value: 'auto'. Supported values are: 'server_commit', 'commit'."),
        ("response_format", "flac",
         "Invalid value: 'flac'. Supported values are: 'pcm', 'wav', 'mp3', 'opus'."),
        ("sample_rate", 22050,
         "Invalid value: '22050'. Supported values are: '8000', '16000', '24000', '48000'."),
        ("sample_rate", True,
         "Invalid value: 'True'. Supported values are: '8000', '16000', '24000', '48000'."),
        ("language_type", "Klingon",
         "Invalid value: 'Klingon'. Supported values are: 'Auto', 'Chinese', 'English', "
         "'German', 'Italian', 'Portuguese', 'Spanish', 'Japanese', 'Korean', 'French', "
         "'Russian'."),
        ("language_type", 3, "Invalid value: '3'. Supported values are: 'Auto', 'Chinese', "
         "'English', 'German', 'Italian', 'Portuguese', 'Spanish', 'Japanese', 'Korean', "
         "'French', 'Russian'."),
        ("speech_rate", 2.5, "Invalid value: 2.5. Supported range is [0.5, 2]."),
        ("pitch_rate", "1", "Invalid value: '1'. Supported range is [0.5, 2]."),
        ("volume", 50.5, "Invalid value: 50.5. Supported range is [0, 100]."),
        ("volume", False, "Invalid value: False. Supported range is [0, 100]."),
        ("bit_rate", 5, "Invalid value: 5. Supported range is [6, 510]."),
        ("enable_tn", "yes", "Invalid value: 'yes'. Expected a boolean."),
        ("optimize_instructions", 1, "Invalid value: 1. Expected a boolean."),
        ("instructions", 7, "Invalid value: 7. Expected a string."),
        ("voice", "", "Invalid value: voice must be a non-empty string."),
        ("voice", None, "Invalid value: voice must be a non-empty string."),
    ],
)  # fmt: skip
def test_every_bad_setting_has_its_error(key: str, value: Any, message: str) -> None:
    assert check_setting(key, value) == (message, f"session.{key}")
    s = ready()
    err = only_error(update(s, **{"bit_rate": 64, key: value}))
    assert err == {"type": "invalid_request_error", "code": "invalid_value", "message": message,
                   "param": f"session.{key}", "event_id": "ev_session.update"}  # fmt: skip
    assert "bit_rate" not in s.settings  # atomic: nothing of it applied


@pytest.mark.parametrize(
    ("key", "value"),
    [("speech_rate", 0.5), ("speech_rate", 2), ("pitch_rate", 1.25), ("volume", 0),
     ("volume", 100), ("bit_rate", 510), ("enable_tn", False), ("instructions", ""),
     ("language_type", "CHINESE"), ("sample_rate", 48000), ("x_vendor_key", [1])],
)  # fmt: skip
def test_good_settings_pass(key: str, value: Any) -> None:
    assert check_setting(key, value) is None


def test_voice_checks_follow_the_documented_errors() -> None:
    s = machine()
    not_supported = f"The requested voice '{NAME}' is not supported."
    for found in (None, Voice(NAME, target_model=m.VC_MODELS[1])):
        err = only_error(update(s, found, voice=NAME))
        assert err["message"] == not_supported and err["param"] == "session.voice"
        assert err["event_id"] == "ev_session.update"
    err = only_error(s.receive(client("session.update", session={"voice": "Cherry"}), 0.0))
    assert err["message"] == "[qwen-tts:]Engine return error code: 411"
    assert err["param"] == "session.voice"
    assert s.voice is None and s.settings["voice"] == "Cherry"  # nothing applied
    (ev,) = update(s, Voice(NAME), voice=NAME)
    assert isinstance(ev, m.SessionUpdated) and s.voice == Voice(NAME)
    with pytest.raises(RuntimeError):
        s.voice_found(Voice(NAME))  # no look-up pending


def test_update_refused_once_a_response_is_queued() -> None:
    s = ready(mode="commit")
    append(s, "Hi.")
    assert texts(s.receive(client("input_text_buffer.commit"), 0.0)) == ["Hi."]
    assert s.state is SessionState.STARTED
    err = only_error(update(s, volume=10))
    assert err["message"] == "Session update error: session already started or finished or failed."
    assert err["code"] == "invalid_value"


# --- the input buffer and segment cuts ------------------------------------------------------------


def test_server_commit_cuts_on_punctuation_length_and_idle() -> None:
    s = ready(cut_max_chars=10, cut_idle_s=1.0)
    assert append(s, "Hello", now=5.0) == [] and s.buffered == 5
    assert s.idle_cut_at() == 6.0
    assert texts(append(s, " there.", now=5.5)) == ["Hello there."]
    assert s.buffered == 0 and s.idle_cut_at() is None
    for zh in ("你好。", "好！", "行\n"):
        assert texts(append(s, zh)) == [zh]
    assert texts(append(s, "0123456789")) == ["0123456789"]  # cut_max_chars
    append(s, "tail", now=7.0)
    assert s.idle_cut_at() == 8.0 and texts(s.idle()) == ["tail"]
    assert s.idle() == []  # nothing left to cut


def test_commit_mode_cuts_only_on_commit_and_clear_discards() -> None:
    s = ready(mode="commit")
    assert append(s, "One. Two.") == [] and s.idle_cut_at() is None
    (cleared,) = s.receive(client("input_text_buffer.clear"), 0.0)
    assert isinstance(cleared, m.InputTextBufferCleared) and s.buffered == 0
    err = only_error(s.receive(client("input_text_buffer.commit"), 0.0))
    assert err == {"type": "invalid_request_error", "code": "invalid_value",
                   "message": "Input text buffer is empty.",
                   "event_id": "ev_input_text_buffer.commit"}  # §5.7 C  # fmt: skip
    append(s, "Three.")
    (job,) = s.receive(client("input_text_buffer.commit"), 0.0)
    assert job == Synthesize("Three.", Voice(NAME), s.settings)


def test_text_without_a_cloned_voice_gets_the_engine_error_and_is_dropped() -> None:
    s = machine()
    err = only_error(append(s, "Hello."))
    assert err["message"] == "[qwen-tts:]Engine return error code: 411"
    assert err["param"] == "session.voice" and s.buffered == 0 and s.state is SessionState.OPEN


def test_buffer_limit_and_empty_appends() -> None:
    s = ready(mode="commit", max_buffer_chars=5)
    assert append(s, "") == [] and append(s, "abc") == []
    err = only_error(append(s, "def"))
    assert err["message"] == "Input text buffer is full (5 characters)." and s.buffered == 3


def test_finish_flushes_the_buffer_then_refuses_everything() -> None:
    s = ready()
    append(s, "left over")
    out = s.receive(client("session.finish"), 0.0)
    assert texts(out) == ["left over"] and out[-1] == Finish()
    assert s.state is SessionState.FINISHING and s.idle_cut_at() is None
    for kind in ("input_text_buffer.append", "session.update", "session.finish"):
        err = only_error(s.receive(client(kind, text="x", session={}), 0.0))
        assert err["message"] == "Session is finishing: no more events accepted."
        assert err["event_id"] == f"ev_{kind}"
    end = s.finished()
    assert isinstance(end[0], m.SessionFinished) and end[1:] == [Close(1000)]
    assert ready().receive(client("session.finish"), 0.0) == [Finish()]  # nothing to flush


@given(st.lists(st.text(alphabet="ab .!\n你", max_size=12), max_size=30))
def test_server_commit_loses_no_text_and_cuts_by_the_rule(appends: list[str]) -> None:
    s = ready(cut_max_chars=20)
    cut: list[str] = []
    for text in appends:
        cut += texts(append(s, text))
    for segment in cut:
        assert segment[-1] in "。！？!?；;.\n" or len(segment) >= 20
    cut += texts(s.receive(client("session.finish"), 0.0))
    assert "".join(cut) == "".join(appends)
    assert all(cut)  # no empty segment


# --- unknown, malformed and cancel ------------------------------------------------------------


def test_unknown_malformed_and_binary_frames() -> None:
    s = ready()
    err = only_error(s.receive(client("response.create"), 0.0))
    assert err["message"] == "Unsupported event type: 'response.create'."
    assert err["event_id"] == "ev_response.create" and err["code"] == "invalid_value"
    assert s.malformed("frame is not valid JSON").error["message"] == (
        "Invalid event: frame is not valid JSON"
    )
    assert s.binary_frame().error == {"type": "invalid_request_error", "code": "invalid_value",
                                      "message": "Binary frames are not supported."}  # fmt: skip
    assert s.refusal(client("input_text_buffer.clear")) is None


def test_cancel_is_an_unknown_event_by_default() -> None:
    s = ready()
    err = only_error(s.receive(client("response.cancel"), 0.0))
    assert err["message"] == "Unsupported event type: 'response.cancel'."


def test_cancel_in_truncate_mode_stops_the_response_in_progress() -> None:
    s = ready(cancel="truncate")
    err = only_error(s.receive(client("response.cancel"), 0.0))
    assert err["message"] == "Cancellation failed: no active response found."
    (job,) = append(s, "Hello.")
    assert isinstance(job, Synthesize)
    r = s.start_response(job)
    assert s.responding and s.receive(client("response.cancel"), 0.0) == [StopAudio(r.response_id)]
    *_, done = s.end_response(completed=False)
    assert isinstance(done, m.ResponseDone) and done.status == "incomplete"
    assert done.response["status_details"] == {"type": "incomplete", "reason": "client_cancelled"}
    assert not s.responding


# --- responses ----------------------------------------------------------------------------------


def respond(s: Machine, text: str, **end: Any) -> list[m.ServerEvent | Output]:
    (job,) = append(s, text)
    assert isinstance(job, Synthesize)
    r = s.start_response(job)
    return [*r.events, *s.end_response(**end)]


def test_response_events_come_in_the_documented_order() -> None:
    s = ready()
    out = respond(s, "你好, world.", completed=True)
    assert [e.type for e in out if isinstance(e, m.ServerEvent)] == [
        "input_text_buffer.committed", "response.created", "response.output_item.added",
        "response.content_part.added", "response.audio.done", "response.content_part.done",
        "response.output_item.done", "response.done",
    ]  # §5.6  # fmt: skip
    created, done = out[1], out[-1]
    assert isinstance(created, m.ResponseCreated) and isinstance(done, m.ResponseDone)
    assert created.response_id == done.response_id and created.response["voice"] == NAME
    assert done.status == "completed" and done.characters == 2 * 2 + 8  # Han counts 2 (§5.12)
    assert "status_details" not in done.response
    rid = created.response_id
    assert all(getattr(e, "response_id", rid) == rid for e in out[2:])
    ids = [e.event_id for e in out if isinstance(e, m.ServerEvent)]
    assert len(set(ids)) == len(ids)
    (r2,) = texts(append(s, "Again."))
    assert r2 == "Again."  # the session goes on: several responses per session


def test_a_failed_response_says_why_then_closes() -> None:
    s = ready()
    (job,) = append(s, "Hi.")
    assert isinstance(job, Synthesize)
    s.start_response(job)
    failure = Failure("Throttling.EngineCapacity", "busy", 1013)
    err, *_, done, close = s.end_response(completed=False, failure=failure)
    assert isinstance(err, m.Error) and err.error == {"code": "Throttling.EngineCapacity",
                                                      "message": "busy"}  # fmt: skip
    assert not err.recoverable
    assert isinstance(done, m.ResponseDone) and done.status == "failed"
    assert done.response["status_details"] == {"type": "failed",
                                               "error": {"code": "Throttling.EngineCapacity"}}
    assert close == Close(1013, "synthesis")
    with pytest.raises(RuntimeError):
        s.end_response(completed=True)


def test_the_client_state_machine_accepts_what_the_server_sends() -> None:
    """The two pure halves agree: a whole session goes through protocol.ClientSession."""
    s, c = machine(), p.ClientSession(config={"voice": NAME, "mode": "server_commit"})
    notes: list[p.Notification] = []

    def deliver(frames: list[bytes]) -> None:
        notes.extend(n for f in frames for n in c.receive(m.parse_server_event(f)))

    def wire(out: list[Output]) -> list[bytes]:
        return [m.dumpb(e) for e in out if isinstance(e, m.ServerEvent)]

    deliver([m.dumpb(s.created())])
    deliver(wire(update(s, Voice(NAME), **c.update().session)))
    c.append("Hello.")
    (job,) = append(s, "Hello.")
    assert isinstance(job, Synthesize)
    r = s.start_response(job)
    frames = DeltaFrames(s.ids, r.response_id, r.item_id)
    deliver([*wire(list(r.events)), frames.frame(pybase64.b64encode(b"\0\0" * 10))])
    deliver(wire(s.end_response(completed=True)))
    c.finish()
    deliver(wire(s.receive(client("session.finish"), 0.0) + s.finished()))
    kinds = [type(n).__name__ for n in notes if not isinstance(n, p.Ignored)]
    assert kinds == ["Created", "Configured", "BufferCommitted", "ResponseStarted",
                     "AudioReceived", "ResponseFinished", "SessionComplete"]  # fmt: skip
    assert c.state is p.State.FINISHED


# --- the delta hot path against the dataclass ----------------------------------------------------


@pytest.mark.parametrize("stamp", [None, 12345.678901, 0.5])
@pytest.mark.parametrize("audio", [b"", b"\x01\x02", bytes(range(256)) * 19])
def test_hand_built_delta_matches_the_dataclass(stamp: float | None, audio: bytes) -> None:
    """Same JSON object (key order is not a contract: the hand-built frame keeps the live
    service's order, ``delta`` last; the dataclass writes its fields in declaration order)."""
    ids = Ids(b"d" * 13, 41)
    frames = DeltaFrames(ids, "resp_A", "item_B")
    b64 = pybase64.b64encode(audio)
    frame = frames.frame(b64, stamp)
    event = frames.event("event_" + Ids(b"d" * 13, 41).next().decode(), b64.decode(), stamp)
    assert orjson.loads(frame) == m.to_dict(event) == orjson.loads(m.dumpb(event))
    assert m.parse_server_event(frame) == event
    assert list(orjson.loads(frame))[-1] == "delta"
    assert frame.startswith(b'{"event_id":"event_') and b" " not in frame


def test_every_server_event_round_trips_through_the_client_parser() -> None:
    s = ready()
    events = [e for e in respond(s, "Hi.", completed=True) if isinstance(e, m.ServerEvent)]
    events += [s.created(), s.error("c", "m", param="p", client_event_id="e")]
    for event in events:
        back = m.parse_server_event(m.dumpb(event))
        assert back == event and type(back) is type(event)
        assert m.dumpb(back) == m.dumpb(event) == m.dumps(event).encode()
    same = dataclasses.replace(events[0])
    assert m.dumpb(same) == m.dumpb(events[0])


def test_ids_are_prefixed_base62_counters() -> None:
    ids = Ids(b"a" * 13, 0)
    assert ids.next() == b"a" * 13 + b"00000001"
    assert Ids(b"a" * 13, 8).next().endswith(b"00000009")
    assert Ids(b"a" * 13, 9).next().endswith(b"0000000a")
    assert Ids(b"a" * 13, 60).next().endswith(b"0000000Z")
    assert Ids(b"a" * 13, 61).next().endswith(b"00000010")
    assert Ids(b"a" * 13, 62**8 - 1).next().endswith(b"00000000")  # eight digits, wrapping
    made = [Ids().make("resp_") for _ in range(50)]
    assert len(set(made)) == 50
    alphabet = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert all(len(i) == 5 + 21 and set(i[5:]) <= alphabet for i in made)
