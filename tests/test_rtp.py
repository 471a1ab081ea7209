"""RTP sink: pure packet layer, G.711 against the ITU algorithm, and real UDP on loopback.

The receiving side is a plain UDP socket (tests/rtp_receiver.py); timing is asserted with
generous bounds only (the precise figures live in bench/rtp_pacing.py).
"""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks import RtpSink
from sinks.g711 import (
    ALAW_DECODE,
    ULAW_DECODE,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)
from sinks.rtp import (
    NTP_EPOCH_OFFSET,
    RTCP_BYE,
    RTCP_SDES,
    RtcpSenderReport,
    RtpExtension,
    RtpPacket,
    rtcp_bye,
    rtcp_sdes_cname,
)
from tests.rtp_receiver import UdpReceiver, decode_payloads, free_udp_port, unwrap_sequence
from tts_stream.audio import AudioFormat, Frame
from tts_stream.errors import ClosedError, ProtocolViolation, UsageError

# ---------------------------------------------------------------------------------------------
# G.711: a straightforward scalar transcription of the ITU-T reference algorithm (G.191 STL
# g711.c: ulaw_compress, alaw_compress, ulaw_expand, alaw_expand), one sample at a time.


def ref_ulaw_compress(x: int) -> int:
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33  # 14-bit, ones' complement, bias 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = 0x000F - ((absno >> segno) & 0x000F)
    code = (high_nibble << 4) | low_nibble
    return code | 0x0080 if x >= 0 else code


def ref_alaw_compress(x: int) -> int:
    ix = (~x) >> 4 if x < 0 else x >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x0080
    return ix ^ 0x0055


def ref_ulaw_expand(code: int) -> int:
    sign = -1 if code < 0x80 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x0007
    segment = exponent + 1
    mantissa &= 0x000F
    step = 4 << segment
    return sign * ((0x0080 << exponent) + step * mantissa + step // 2 - 4 * 33)


def ref_alaw_expand(code: int) -> int:
    ix = (code ^ 0x0055) & 0x007F
    iexp = ix >> 4
    mant = ix & 0x000F
    if iexp > 0:
        mant += 16
    mant = (mant << 4) + 0x0008
    if iexp > 1:
        mant <<= iexp - 1
    return mant if code > 127 else -mant


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.parametrize(
    ("encode", "reference"), [(ulaw_encode, ref_ulaw_compress), (alaw_encode, ref_alaw_compress)]
)
def test_g711_encode_all_int16_bit_exact(encode: object, reference: object) -> None:
    got = encode(ALL_INT16)  # type: ignore[operator]
    want = bytes(reference(int(x)) for x in range(-32768, 32768))  # type: ignore[operator]
    assert got == want


def test_g711_decode_tables() -> None:
    assert ULAW_DECODE.tolist() == [ref_ulaw_expand(c) for c in range(256)]
    assert ALAW_DECODE.tolist() == [ref_alaw_expand(c) for c in range(256)]
    # spot values from the G.711 tables: full scale and the smallest steps
    assert ULAW_DECODE[0x80] == 32124 and ULAW_DECODE[0x00] == -32124
    assert ULAW_DECODE[0xFF] == 0 and ULAW_DECODE[0x7F] == 0 and ULAW_DECODE[0xFE] == 8
    assert ALAW_DECODE[0xD5] == 8 and ALAW_DECODE[0x55] == -8
    assert ALAW_DECODE[0xAA] == 32256 and ALAW_DECODE[0x2A] == -32256
    codes = bytes(range(256))
    np.testing.assert_array_equal(ulaw_decode(codes), ULAW_DECODE)
    np.testing.assert_array_equal(alaw_decode(codes), ALAW_DECODE)


def test_g711_properties() -> None:
    for encode, decode in ((ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)):
        pos = np.frombuffer(encode(ALL_INT16), np.uint8)
        neg = np.frombuffer(encode(~ALL_INT16), np.uint8)
        assert ((pos ^ neg) == 0x80).all()  # x and ~x differ only in the sign bit
        # every reconstruction value encodes back to a code with that same value
        values = decode(bytes(range(256)))
        np.testing.assert_array_equal(decode(encode(values)), values)
        # the quantisation error stays within half a step: 1/32 of the value, plus the floor
        err = np.abs(decode(encode(ALL_INT16)).astype(np.int32) - ALL_INT16)
        assert (err <= np.abs(ALL_INT16.astype(np.int32)) // 32 + 130).all()


# ---------------------------------------------------------------------------------------------
# Pure packet layer


u32 = st.integers(0, 2**32 - 1)
packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence_number=st.integers(0, 65535),
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=400),
    marker=st.booleans(),
    csrc=st.lists(u32, max_size=15).map(tuple),
    extension=st.none()
    | st.builds(
        RtpExtension,
        profile=st.integers(0, 65535),
        data=st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]),
    ),
    padding=st.integers(0, 255),
)


@given(packets)
@settings(deadline=None)  # shared, noisy CI machines
def test_rtp_packet_round_trip(packet: RtpPacket) -> None:
    data = packet.serialize()
    assert RtpPacket.parse(data) == packet
    assert (
        data[0] >> 6 == 2
        and len(data)
        == 12
        + 4 * len(packet.csrc)
        + (4 + len(packet.extension.data) if packet.extension else 0)
        + len(packet.payload)
        + packet.padding
    )


@given(st.binary(max_size=64))
@settings(deadline=None)  # shared, noisy CI machines
def test_rtp_parse_rejects_garbage_cleanly(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except ProtocolViolation:
        return
    assert RtpPacket.parse(packet.serialize()) == packet


def test_rtp_packet_fields() -> None:
    p = RtpPacket(0, 65535, 2**32 - 1, 0xDEADBEEF, b"\xff" * 160, marker=True)
    data = p.serialize()
    assert data[:12] == bytes.fromhex("8080ffffffffffffdeadbeef")
    with pytest.raises(ProtocolViolation):
        RtpPacket.parse(data[:11])
    with pytest.raises(ProtocolViolation, match="version"):
        RtpPacket.parse(b"\x40" + data[1:])
    with pytest.raises(ProtocolViolation, match="padding"):
        RtpPacket.parse(b"\xa0" + data[1:-1] + b"\x00")
    for bad in ({"payload_type": 128}, {"sequence_number": 65536}, {"ssrc": -1}, {"padding": 256}):
        with pytest.raises(UsageError):
            RtpPacket(**{"payload_type": 0, "sequence_number": 0, "timestamp": 0, "ssrc": 0, **bad})  # type: ignore[arg-type]


@given(u32, st.integers(0, 2**64 - 1), u32, u32, u32)
@settings(deadline=None)  # shared, noisy CI machines
def test_rtcp_sender_report_round_trip(ssrc: int, ntp: int, ts: int, pk: int, octets: int) -> None:
    sr = RtcpSenderReport(ssrc, ntp, ts, pk, octets)
    data = sr.serialize()
    assert len(data) == 28 and data[:2] == b"\x80\xc8" and struct.unpack("!H", data[2:4]) == (6,)
    assert RtcpSenderReport.parse(data + rtcp_bye(ssrc)) == sr


@given(u32, st.text(max_size=80))
@settings(deadline=None)  # shared, noisy CI machines
def test_rtcp_sdes_and_bye_layout(ssrc: int, cname: str) -> None:
    sdes = rtcp_sdes_cname(ssrc, cname)
    assert len(sdes) % 4 == 0 and sdes[1] == RTCP_SDES and sdes[0] == 0x81
    assert (struct.unpack("!H", sdes[2:4])[0] + 1) * 4 == len(sdes)
    text = cname.encode()[:255]
    assert sdes[8:10] == bytes([1, len(text)]) and sdes[10 : 10 + len(text)] == text
    assert sdes[10 + len(text)] == 0  # END item
    bye = rtcp_bye(ssrc)
    assert bye[:4] == bytes([0x81, RTCP_BYE, 0, 1]) and bye[4:] == struct.pack("!I", ssrc)


# ---------------------------------------------------------------------------------------------
# The sink's configuration and SDP


def test_sdp_and_options() -> None:
    assert RtpSink.preferred_sample_rate == 8000
    sink = RtpSink("127.0.0.1", 40000, codec="pcma", ptime_ms=30, rtcp=True)
    sdp = sink.sdp()
    assert sdp.endswith("\r\n")
    lines = sdp.splitlines()
    assert lines[0] == "v=0" and "c=IN IP4 127.0.0.1" in lines
    assert "m=audio 40000 RTP/AVP 8" in lines and "a=rtpmap:8 PCMA/8000" in lines
    assert "a=ptime:30" in lines and "a=rtcp:40001" in lines
    assert sink.samples_per_packet == 240
    l16 = RtpSink("::1", 40000, codec="l16")
    assert l16.preferred_sample_rate is None  # sends the stream's own rate
    with pytest.raises(UsageError, match="open"):
        l16.sdp()
    wide = RtpSink("::1", 40000, codec="L16", clock_rate=16000, payload_type=100)
    assert wide.preferred_sample_rate == 16000
    assert "c=IN IP6 ::1" in wide.sdp() and "a=rtpmap:100 L16/16000/1" in wide.sdp()
    assert RtpSink("h", 1, codec="l16", clock_rate=44100).payload_type == 11
    for kwargs in (
        {"codec": "opus"},
        {"ptime_ms": 5},
        {"ptime_ms": 80},
        {"payload_type": 128},
        {"codec": "pcmu", "clock_rate": 16000},
        {"buffer_ms": 20},
        {"ssrc": 2**32},
        {"initial_sequence": -1},
        {"initial_timestamp": 2**32},
        {"rtcp_interval": 0},
    ):
        with pytest.raises(UsageError):
            RtpSink("127.0.0.1", 40000, **kwargs)


async def test_stereo_refused() -> None:
    sink = RtpSink("127.0.0.1", 40000)
    with pytest.raises(UsageError, match="mono"):
        await sink.open(AudioFormat(8000, channels=2))
    await sink.aclose()


# ---------------------------------------------------------------------------------------------
# Over loopback UDP


def tone(seconds: float, rate: int, freq: float = 440.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


async def test_sequence_timestamp_marker_ssrc_spacing() -> None:
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, ssrc=0x12345678)
        await sink.open(AudioFormat(8000))
        t0 = time.monotonic()
        audio = tone(1.0, 8000)
        for i in range(0, len(audio), 800):
            await sink.write(Frame(audio[i : i + 800]))
        await sink.drain()
        elapsed = time.monotonic() - t0
        await sink.aclose()
        rx.flush()
    pk = rx.packets
    assert len(pk) == 50
    assert {p.ssrc for p in pk} == {0x12345678} and {p.payload_type for p in pk} == {0}
    assert [p.marker for p in pk] == [True] + [False] * 49
    assert all(len(p.payload) == 160 for p in pk)
    seq = unwrap_sequence([p.sequence_number for p in pk])
    assert seq == list(range(seq[0], seq[0] + 50))
    steps = {(b.timestamp - a.timestamp) % 2**32 for a, b in zip(pk[:-1], pk[1:], strict=True)}
    assert steps == {160}
    np.testing.assert_array_equal(decode_payloads(pk, "pcmu"), ulaw_decode(ulaw_encode(audio)))
    # paced, not burst: 50 packets take ~49 x 20 ms (generous bounds, noisy 2-core machines)
    arrivals = np.array([a.at for a in rx.arrivals])
    assert 0.85 < arrivals[-1] - arrivals[0] < 1.4 and 0.9 < elapsed < 1.6
    assert 0.015 < float(np.median(np.diff(arrivals))) < 0.025
    st = sink.stats()
    assert (st.samples_written, st.samples_played, st.underruns) == (8000, 8000, 0)
    rs = sink.rtp_stats()
    assert (rs.packets_sent, rs.octets_sent, rs.talk_spurts) == (50, 8000, 1)


async def test_wrap_around() -> None:
    async with UdpReceiver() as rx:
        sink = RtpSink(
            "127.0.0.1",
            rx.port,
            codec="pcma",
            ptime_ms=10,
            initial_sequence=65530,
            initial_timestamp=2**32 - 400,
        )
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(tone(0.15, 8000)))
        await sink.aclose()
        rx.flush()
    pk = rx.packets
    assert [p.sequence_number for p in pk] == [*range(65530, 65536), *range(0, 9)]
    assert [p.timestamp for p in pk] == [(2**32 - 400 + 80 * i) % 2**32 for i in range(15)]
    assert [p.payload_type for p in pk] == [8] * 15


async def test_talk_spurts_gap_and_underrun() -> None:
    """Marker at each spurt; seq continuous; timestamps follow real time across silences."""
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port)
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(tone(0.1, 8000)))  # spurt 1: 5 packets
        await sink.drain()
        await sink.write(Frame(tone(0.1, 8000)))  # spurt 2 right after: no timestamp jump
        await sink.drain()
        await asyncio.sleep(0.3)  # the stimulus: 300 ms of silence (not a synchronisation)
        await sink.write(Frame(tone(0.1, 8000)))  # spurt 3, after a gap
        await rx.wait_for_count(15)
        await asyncio.sleep(0.2)  # the producer is late: an underrun, not an end
        await sink.write(Frame(tone(0.1, 8000)))  # spurt 4
        await sink.drain()
        await sink.aclose()
        rx.flush()
    pk, at = rx.packets, [a.at for a in rx.arrivals]
    assert len(pk) == 20
    assert [i for i, p in enumerate(pk) if p.marker] == [0, 5, 10, 15]
    seq = unwrap_sequence([p.sequence_number for p in pk])
    assert seq == list(range(seq[0], seq[0] + 20))
    dts = [(b.timestamp - a.timestamp) % 2**32 for a, b in zip(pk[:-1], pk[1:], strict=True)]
    assert dts[4] == 160  # back-to-back spurts: the RTP clock simply continues
    for i in (9, 14):  # after a silence: the jump matches the elapsed time (±100 ms)
        assert abs(dts[i] - (at[i + 1] - at[i]) * 8000) < 800, (i, dts[i])
        assert dts[i] > 160 + 0.1 * 8000
    # within a spurt one packet time apart, also the packets queued before its jump was known
    assert {d for i, d in enumerate(dts) if i not in (9, 14)} == {160}
    assert sink.stats().underruns == 1 and sink.rtp_stats().talk_spurts == 4


async def test_timestamps_after_a_silence_with_a_blocked_writer() -> None:
    """A spurt after a silence, written faster than real time into a small buffer: the
    packets queued before the spurt started, and those the writer queued while it waited,
    all carry the spurt's timestamps (one jump, then one packet time apart)."""
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, buffer_ms=100, prebuffer_ms=60)
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(tone(0.04, 8000)))
        await sink.drain()
        await asyncio.sleep(0.25)  # the stimulus: a silence
        for _ in range(4):
            await sink.write(Frame(tone(0.1, 8000)))  # blocks: 5 packets of room
        await sink.drain()
        await sink.aclose()
        rx.flush()
    pk, at = rx.packets, [a.at for a in rx.arrivals]
    assert len(pk) == 2 + 20
    assert [i for i, p in enumerate(pk) if p.marker] == [0, 2]
    seq = unwrap_sequence([p.sequence_number for p in pk])
    assert seq == list(range(seq[0], seq[0] + 22))
    dts = [(b.timestamp - a.timestamp) % 2**32 for a, b in zip(pk[:-1], pk[1:], strict=True)]
    assert abs(dts[1] - (at[2] - at[1]) * 8000) < 800 and dts[1] > 160 + 0.2 * 8000
    assert set(dts[:1] + dts[2:]) == {160}


async def test_interrupt_stops_at_once_and_next_spurt_has_marker() -> None:
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, codec="l16")
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(np.full(8000, 1000, np.int16)))  # 1 s queued
        await rx.wait_for_count(3)
        played = await sink.interrupt()
        await sink.write(Frame(np.full(800, -1000, np.int16)))
        await sink.drain()
        await sink.aclose()
        rx.flush()
    values = [int(np.frombuffer(p.payload, ">i2")[0]) for p in rx.packets]
    first_new = values.index(-1000)
    assert set(values[:first_new]) == {1000} and set(values[first_new:]) == {-1000}
    assert rx.packets[first_new].marker and 3 <= first_new <= 6
    assert played == first_new * 160
    st = sink.stats()
    assert st.samples_played == played + 800 and st.dropped_samples == 8000 - played


async def test_prebuffer_holds_a_trickle_back() -> None:
    """A spurt starting with one packet of audio waits for prebuffer_ms (or more audio)."""
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, prebuffer_ms=100)
        await sink.open(AudioFormat(8000))
        t0 = time.monotonic()
        await sink.write(Frame(tone(0.02, 8000)))  # one packet: less than the prebuffer
        await rx.wait_for_count(1)
        assert rx.arrivals[0].at - t0 >= 0.09
        t1 = time.monotonic()
        await sink.write(Frame(tone(0.02, 8000)))
        await sink.drain()  # the end of the audio: no reason to wait any more
        assert time.monotonic() - t1 < 5.0
        await sink.aclose()
        rx.flush()
    assert [p.marker for p in rx.packets] == [True, True]  # two spurts: an underrun between
    assert sink.stats().underruns == 1


async def test_close_wakes_blocked_writer() -> None:
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, buffer_ms=100)
        await sink.open(AudioFormat(8000))

        async def writer() -> None:
            with pytest.raises(ClosedError):
                await sink.write(Frame(tone(2.0, 8000)))  # 100 packets into a 5-packet queue

        async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
            tg.create_task(writer())
            await rx.wait_for_count(2)
            await sink.aclose()
    st = sink.stats()  # the refused part of the frame is dropped, what went out is played
    assert st.samples_written == 16000
    assert st.samples_played == 160 * sink.rtp_stats().packets_sent
    assert st.samples_played + st.dropped_samples == 16000 and st.dropped_samples > 0


async def test_resampler_state_kept_and_anti_aliased() -> None:
    """24 kHz in, 8 kHz L16 out: chunked output equals one-shot resampling; >4 kHz removed."""
    audio = (tone(1.0, 24000, 700.0, 0.2) + tone(1.0, 24000, 6000.0, 0.2)).astype(np.int16)
    async with UdpReceiver() as rx:
        sink = RtpSink("127.0.0.1", rx.port, codec="l16", clock_rate=8000)
        await sink.open(AudioFormat(24000))
        for i in range(0, len(audio), 1234):
            await sink.write(Frame(audio[i : i + 1234]))
        await sink.drain()
        await sink.aclose()
        rx.flush()
    got = decode_payloads(rx.packets, "l16")
    ref = soxr.ResampleStream(24000, 8000, 1, dtype="float32", quality="HQ")
    want = np.rint(ref.resample_chunk(audio.astype(np.float32), last=True)).astype(np.int16)
    # no state lost between chunks: identical to resampling the whole signal at once
    np.testing.assert_array_equal(got[: len(want)], want)
    assert not got[len(want) :].any() and len(got) - len(want) < 160
    spectrum = np.abs(np.fft.rfft(got[800:7200].astype(np.float64)))
    freqs = np.fft.rfftfreq(6400, 1 / 8000)

    def at(f: float) -> float:
        return float(spectrum[np.argmin(np.abs(freqs - f))])

    # 6 kHz would alias to 2 kHz without the low-pass; it must be far below the 700 Hz tone
    assert at(2000) < at(700) / 1000


async def test_rtcp_sender_reports() -> None:
    port = free_udp_port(pair=True)
    async with UdpReceiver(port) as rx, UdpReceiver(port + 1, parse=False) as rtcp:
        sink = RtpSink("127.0.0.1", port, rtcp=True, rtcp_interval=0.2, cname="me@test")
        await sink.open(AudioFormat(8000))
        await sink.write(Frame(tone(1.0, 8000)))
        await rtcp.wait_for_count(2)
        await sink.drain()
        await sink.aclose()
        rx.flush()
        rtcp.flush()
    reports = rtcp.arrivals
    assert len(reports) >= 3  # periodic ones, and the last one carries a BYE
    pk = rx.packets  # loopback keeps one socket's datagrams in send order
    assert len(pk) == 50
    for rep in reports:
        sr = RtcpSenderReport.parse(rep.data)
        assert sr.ssrc == sink.ssrc
        assert abs(sr.ntp_timestamp / 2**32 - NTP_EPOCH_OFFSET - time.time()) < 10
        assert 1 <= sr.packet_count <= len(pk) and sr.octet_count == 160 * sr.packet_count
        # the RTP timestamp is the last packet's, extrapolated to the report's instant:
        # within one packet time of it, give or take scheduling delays (generous bound)
        ahead = (sr.rtp_timestamp - pk[sr.packet_count - 1].timestamp) % 2**32
        assert ahead < 160 + 800, ahead
        assert b"me@test" in rep.data[28:]
    assert reports[-1].data.endswith(rtcp_bye(sink.ssrc))
    assert not any(r.data.endswith(rtcp_bye(sink.ssrc)) for r in reports[:-1])


async def test_many_sinks_share_one_loop_without_drift() -> None:
    async with UdpReceiver() as rx:
        sinks = [RtpSink("127.0.0.1", rx.port, ssrc=i + 1) for i in range(30)]
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            for s in sinks:
                await s.open(AudioFormat(8000))
            for s in sinks:
                tg.create_task(s.write(Frame(tone(1.0, 8000))))
        for s in sinks:
            await s.drain()
            await s.aclose()
        rx.flush()
    by_ssrc: dict[int, list[float]] = {}
    for a in rx.arrivals:
        assert a.packet is not None
        by_ssrc.setdefault(a.packet.ssrc, []).append(a.at)
    assert sorted(by_ssrc) == list(range(1, 31))
    for times in by_ssrc.values():
        assert len(times) == 50
        assert 0.85 < times[-1] - times[0] < 1.4  # each stream keeps its own 20 ms grid


async def test_redirect_moves_the_stream_on_without_a_break() -> None:
    """redirect() (a re-INVITE's new media): the next packets go to the new address from the
    same socket, with the same SSRC and continuous sequence numbers and timestamps."""
    audio = tone(1.0, 8000)
    async with UdpReceiver() as a, UdpReceiver() as b:
        sink = RtpSink("127.0.0.1", a.port, prebuffer_ms=0)
        await sink.open(AudioFormat(8000))
        source = sink.local_address
        await sink.write(Frame(audio))
        await a.wait_for_count(10)
        sink.redirect("127.0.0.1", b.port)
        await sink.drain()
        assert sink.local_address == source and (sink.host, sink.port) == ("127.0.0.1", b.port)
        await sink.aclose()
        a.flush()
        b.flush()
    first, rest = a.packets, b.packets
    assert len(first) >= 10 and rest and len(first) + len(rest) == 50
    pk = first + rest
    assert {p.ssrc for p in pk} == {sink.ssrc} and not rest[0].marker
    seq = unwrap_sequence([p.sequence_number for p in pk])
    assert seq == list(range(seq[0], seq[0] + 50))
    steps = {(y.timestamp - x.timestamp) % 2**32 for x, y in zip(pk[:-1], pk[1:], strict=True)}
    assert steps == {160}
    np.testing.assert_array_equal(decode_payloads(pk, "pcmu"), ulaw_decode(ulaw_encode(audio)))
    with pytest.raises(UsageError, match="IP address"):
        sink.redirect("localhost", 4000)
    with pytest.raises(UsageError, match="RTCP"):
        RtpSink("127.0.0.1", 4000, rtcp=True).redirect("127.0.0.1", 4002)
