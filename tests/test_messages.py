"""Pure tests of the wire vocabulary: the protocol.md transcripts round-trip, parsers fuzzed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tts_stream import messages as m
from tts_stream.errors import ProtocolViolation

TRANSCRIPTS = Path(__file__).parent / "data" / "transcripts.jsonl"


def transcript_messages() -> list[tuple[str, dict[str, Any]]]:
    rows = [json.loads(line) for line in TRANSCRIPTS.read_text().splitlines() if line]
    return [(r["dir"], r["msg"]) for r in rows if r["kind"] == "msg"]


@pytest.mark.parametrize(("direction", "msg"), transcript_messages())
def test_transcript_events_round_trip(direction: str, msg: dict[str, Any]) -> None:
    parse = m.parse_client_event if direction == "c2s" else m.parse_server_event
    event = parse(orjson.dumps(msg))
    assert not isinstance(event, m.UnknownEvent), msg["type"]
    assert event.type == msg["type"]
    assert m.to_dict(event) == msg
    assert orjson.loads(m.dumps(event)) == msg


def test_every_documented_event_type_appears_in_a_transcript() -> None:
    seen = {msg["type"] for _, msg in transcript_messages()}
    assert set(m.ALL_EVENTS) - seen == {"response.cancel"}


def test_typed_accessors_on_transcript_events() -> None:
    by_type: dict[str, dict[str, Any]] = {}
    for _, msg in transcript_messages():
        by_type.setdefault(msg["type"], msg)  # the first of each type: transcript A
    done = m.parse_server_event(orjson.dumps(by_type["response.done"]))
    assert isinstance(done, m.ResponseDone)
    assert done.characters == 78 and done.status == "completed"
    assert done.response_id.startswith("resp_")
    delta = m.parse_server_event(orjson.dumps(by_type["response.audio.delta"]))
    assert isinstance(delta, m.ResponseAudioDelta) and delta.delta == "AAAAAAAAAAAAAAAA"
    err = m.parse_server_event(orjson.dumps(by_type["error"]))
    assert isinstance(err, m.Error) and err.code == "invalid_value" and err.message


def test_newer_error_shape_is_not_recoverable_and_older_is() -> None:
    newer = m.parse_server_event(b'{"type":"error","error":{"code":"c","message":"x"}}')
    older = m.parse_server_event(
        b'{"type":"error","error":{"type":"invalid_request_error","code":"c","msg":"y"}}'
    )
    assert isinstance(newer, m.Error) and not newer.recoverable
    assert isinstance(older, m.Error) and older.recoverable and older.message == "y"


def test_unknown_events_and_extra_keys_are_kept() -> None:
    frame = b'{"type":"response.text.delta","event_id":"e","delta":"hi","n":[1,2]}'
    event = m.parse_server_event(frame)
    assert isinstance(event, m.UnknownEvent)
    assert event.type == "response.text.delta"
    assert orjson.loads(m.dumps(event)) == orjson.loads(frame)
    delta = m.parse_server_event(b'{"type":"response.audio.delta","delta":"AA==","x_sent":1.5}')
    assert delta.extra == {"x_sent": 1.5}
    assert orjson.loads(m.dumps(delta))["x_sent"] == 1.5


def test_client_event_without_event_id_is_accepted() -> None:
    event = m.parse_client_event(b'{"type":"input_text_buffer.append","text":"hi"}')
    assert isinstance(event, m.InputTextBufferAppend) and event.text == "hi"


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"event_id":"x"}', "type"),
        (b'{"type":"input_text_buffer.append"}', "missing required field 'text'"),
        (b'{"type":"input_text_buffer.append","text":5}', "field 'text'"),
        (b'{"type":"session.update","session":"voice"}', "field 'session'"),
        (b'{"type":"session.finish","event_id":7}', "event_id"),
    ],
)
def test_malformed_client_frames_raise_specific_errors(frame: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolViolation, match=fragment.replace("(", r"\(")):
        m.parse_client_event(frame)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_server_event(b'{"type":"response.audio.done","output_index":true}')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    st.sampled_from(sorted(m.ALL_EVENTS) + ["x.unknown"]),
    st.dictionaries(
        st.sampled_from(
            [
                "text",
                "session",
                "delta",
                "response",
                "error",
                "item_id",
                "response_id",
                "output_index",
                "extra_key",
            ]
        ),
        json_values,
        max_size=5,
    ),
)
def test_parsers_never_crash_on_arbitrary_objects(type_name: str, fields: dict[str, Any]) -> None:
    frame = orjson.dumps({"type": type_name, **fields})
    for parse in (m.parse_server_event, m.parse_client_event):
        try:
            event = parse(frame)
        except ProtocolViolation:
            continue
        # Whatever parses serializes back to the same object.
        assert orjson.loads(m.dumps(event)) == {"event_id": "", **orjson.loads(frame)}


@FUZZ
@given(st.binary(max_size=64))
def test_parsers_reject_arbitrary_bytes_cleanly(data: bytes) -> None:
    for parse in (m.parse_server_event, m.parse_client_event):
        try:
            parse(data)
        except ProtocolViolation:
            pass


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Right? I love supermarkets like this. Especially during the New Year holidays.", 78),
        ("您好，我是千问。", 14),
        ("How can I help you today?", 25),
        ("", 0),
        ("日本語かな", 2 * 3 + 2),
        ("𠀀", 2),
    ],
)
def test_billable_characters(text: str, expected: int) -> None:
    assert m.billable_characters(text) == expected


def test_enrollment_builders_match_protocol() -> None:
    body = m.create_voice_request(
        target_model=m.VC_MODELS[0], preferred_name="guanyu", audio_data="data:audio/wav;base64,AA"
    )
    assert body == {
        "model": "qwen-voice-enrollment",
        "input": {
            "action": "create",
            "target_model": "qwen3-tts-vc-realtime-2026-01-15",
            "preferred_name": "guanyu",
            "audio": {"data": "data:audio/wav;base64,AA"},
        },
    }
    assert m.list_voices_request(page_index=2, page_size=5)["input"] == {
        "action": "list",
        "page_index": 2,
        "page_size": 5,
    }
    assert m.delete_voice_request("v")["input"] == {"action": "delete", "voice": "v"}


def test_enrollment_parsers_accept_old_and_new_shapes() -> None:
    old = {"output": {"voice": "v1", "target_model": "t"}, "usage": {"count": 1}, "request_id": "r"}
    new = {
        "output": {
            "voice": "v1",
            "target_model": "t",
            "fallback_mode": True,
            "fallback_reason": "no_merged_segments",
        },
        "request_id": "r",
    }
    assert m.parse_created_voice(old) == m.CreatedVoice("v1", "t", False, None, "r")
    assert m.parse_created_voice(new).fallback_reason == "no_merged_segments"
    page_old = m.parse_voice_page({"output": {"voice_list": [{"voice": "a", "gmt_create": "x"}]}})
    assert page_old.voices[0].voice == "a" and page_old.total_count is None
    page_new = m.parse_voice_page(
        {
            "output": {
                "page_index": 0,
                "page_size": 10,
                "total_count": 1,
                "voice_list": [{"voice": "a", "language": "zh", "target_model": "t"}],
            }
        }
    )
    assert page_new.total_count == 1 and page_new.voices[0].language == "zh"
    with pytest.raises(ProtocolViolation):
        m.parse_created_voice({"usage": {}})
    with pytest.raises(ProtocolViolation):
        m.parse_voice_page({"output": {"voice_list": [{"name": "a"}]}})


def test_enrollment_error_is_liberal() -> None:
    assert m.parse_enrollment_error(None, request_id="hdr") == m.EnrollmentError(None, "", "hdr")
    err = m.parse_enrollment_error({"code": "C", "msg": "text", "request_id": "r"})
    assert err == m.EnrollmentError("C", "text", "r")


def test_event_ids_look_like_the_sdks() -> None:
    a, b = m.new_event_id(), m.new_event_id()
    assert a != b and a.startswith("event_") and len(a) == 6 + 32


# --- the server's side (server/session.py) -------------------------------------------------------


def test_dumpb_is_the_frame_of_dumps_as_bytes() -> None:
    done = m.ResponseDone(event_id="event_1", response={"id": "r", "usage": {"characters": 3}},
                          extra={"x_more": [1]})  # fmt: skip
    frame = m.dumpb(done)
    assert isinstance(frame, bytes) and frame == m.dumps(done).encode()
    assert frame == (
        b'{"event_id":"event_1","type":"response.done",'
        b'"response":{"id":"r","usage":{"characters":3}},"x_more":[1]}'
    )
    assert m.parse_server_event(frame) == done
    assert m.dumpb(m.InputTextBufferCommitted(event_id="e")) == (
        b'{"event_id":"e","type":"input_text_buffer.committed"}'  # None fields are left out
    )
