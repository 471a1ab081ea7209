"""Clone-sample inspection: every rule of protocol.md §4.7, checked locally (no network).

Role: the engine calls :func:`inspect_sample` before any paid enrollment call, and the local
server calls the same function to enforce the same rules, mapping each problem's ``rule`` to
the DashScope error of protocol.md §4.9 through :data:`ERROR_CODES`::

    ERROR_CODES = {
        "format":        ("Audio.DecoderError", "Decoder audio file failed."),
        "decode":        ("Audio.DecoderError", "Decoder audio file failed."),
        "bit_depth":     ("Audio.DecoderError", "Decoder audio file failed."),
        "size":          ("BadRequest.InputDownloadFailed", "Failed to download the input file."),
        "data_uri_size": ("BadRequest.InputDownloadFailed", "Failed to download the input file."),
        "sample_rate":   ("Audio.AudioRateError", "File sample rate unsupported."),
        "duration":      ("Audio.DurationLimitError",
                          "Audio duration exceeds maximum allowed limit."),
        "channels":      ("Audio.PreprocessError", "Audio preprocess error."),
        "speech":        ("Audio.PreprocessError",
                          "No segments meet minimum duration requirement"),
        "pauses":        ("Audio.PreprocessError", "Audio preprocess error."),
    }

Problems are listed in that order (the order the service meets them: download, decode,
rate, duration, preprocessing), so ``report.problems[0]`` is the one a server reports.

How the content rules are measured: the container is recognised by its bytes (RIFF/WAVE, ID3
or an MPEG frame sync, an MP4 ``ftyp`` box), never by the file name. WAV PCM is read with
numpy, MP3/M4A are decoded with PyAV (its wheel bundles FFmpeg). The audio is mixed to mono,
resampled to 16 kHz, and cut into 30 ms frames; a frame is speech when webrtcvad says so *and*
it is periodic (a voice has a pitch; white noise, which webrtcvad often accepts, has none).
Speech frames closer than 0.3 s are merged into segments (unvoiced consonants and stop
closures), segments closer than 0.5 s into runs of continuous reading. Boundary: pure
computation on bytes; the only I/O is reading the file when given a path.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soxr
import webrtcvad
from numpy.lib.stride_tricks import sliding_window_view

from tts_stream.audio import PCM16
from tts_stream.errors import UsageError

__all__ = [
    "CLIPPED_MAX_SHARE",
    "DC_MAX",
    "DECAY_MAX_S",
    "ERROR_CODES",
    "LEVEL_MIN_DBFS",
    "MAX_BYTES",
    "MAX_DURATION_S",
    "MAX_PAUSE_S",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "MIN_SPEECH_S",
    "RECOMMENDED_DURATION_S",
    "SNR_MIN_DB",
    "SPEAKER_GAP_ST",
    "STEADY_MAX_SHARE",
    "Problem",
    "Quality",
    "SampleReport",
    "data_uri",
    "data_uri_size",
    "decode_mono",
    "error_code",
    "inspect_sample",
    "measure_pitch",
    "measure_quality",
    "quality_warnings",
    "sniff_container",
    "speech_span",
]

logger = logging.getLogger(__name__)

MAX_BYTES: Final = 10 * 1024 * 1024
"""The file, and the base64 text of a data URI, must stay under 10 MB (§4.7)."""
MAX_DURATION_S: Final = 60.0
RECOMMENDED_DURATION_S: Final = (10.0, 20.0)
MIN_SAMPLE_RATE: Final = 24000
MAX_SAMPLE_RATE: Final = 384000
"""A higher rate is no recording (the highest studio rate is 384 kHz): refused from the header."""
MIN_SPEECH_S: Final = 3.0
MAX_PAUSE_S: Final = 2.0

ERROR_CODES: Final[dict[str, tuple[str, str]]] = {
    "format": ("Audio.DecoderError", "Decoder audio file failed."),
    "decode": ("Audio.DecoderError", "Decoder audio file failed."),
    "bit_depth": ("Audio.DecoderError", "Decoder audio file failed."),
    "size": ("BadRequest.InputDownloadFailed", "Failed to download the input file."),
    "data_uri_size": ("BadRequest.InputDownloadFailed", "Failed to download the input file."),
    "sample_rate": ("Audio.AudioRateError", "File sample rate unsupported."),
    "duration": ("Audio.DurationLimitError", "Audio duration exceeds maximum allowed limit."),
    "channels": ("Audio.PreprocessError", "Audio preprocess error."),
    "speech": ("Audio.PreprocessError", "No segments meet minimum duration requirement"),
    "pauses": ("Audio.PreprocessError", "Audio preprocess error."),
}
"""Problem rule → (DashScope error code, documented message), protocol.md §4.9."""

_RULE_ORDER: Final = {rule: i for i, rule in enumerate(ERROR_CODES)}
_MIME: Final = {"wav": "audio/wav", "mp3": "audio/mpeg", "mp4": "audio/mp4"}

_VAD_RATE: Final = 16000
_FRAME_S: Final = 0.03
_VAD_MODE: Final = 2
_SEGMENT_GAP_S: Final = 0.3  # speech frames closer than this belong to one segment
_RUN_GAP_S: Final = 0.5  # segments closer than this are one run of continuous reading
_MIN_SEGMENT_S: Final = 0.09  # shorter blips are clicks, not speech
_VOICING: Final = 0.45  # normalised autocorrelation peak of a voiced frame
_OCTAVE_COST: Final = 0.05  # per octave of lag, see _periodicity
# Decoding stops after this much audio: a file whose header hides a longer duration is over
# the limit anyway, and the analysis (memory, CPU) stays bounded whatever the file claims.
_MAX_ANALYSIS_S: Final = MAX_DURATION_S + 1.0
_BLOCK_FRAMES: Final = 256  # frames per FFT block of the periodicity analysis (~4 MB each)
# A path is read up to a little over the limit: enough to see it is too big and to measure
# the rest from its beginning, without loading a huge file.
_READ_LIMIT: Final = MAX_BYTES + 1024 * 1024

Measured = float | int | str | None


@dataclass(frozen=True)
class Problem:
    """One broken rule: its stable ``rule`` id (see :data:`ERROR_CODES`), measured value, limit."""

    rule: str
    message: str
    measured: Measured = None
    limit: Measured = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SampleReport:
    """Everything :func:`inspect_sample` measured, and every rule the sample breaks.

    ``problems`` make the sample unusable (``ok`` is false); ``warnings`` do not (a duration
    outside the recommended 10–20 s, and the recording-quality measures of ``quality``).
    Measurements that could not be made are ``None``.
    """

    problems: tuple[Problem, ...] = ()
    warnings: tuple[Problem, ...] = ()
    mime: str | None = None
    container: str | None = None  # "wav" | "mp3" | "mp4"
    codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    bit_depth: int | None = None
    duration_s: float | None = None
    size_bytes: int = 0
    data_uri_bytes: int = 0
    speech_s: float | None = None
    longest_speech_s: float | None = None
    longest_pause_s: float | None = None
    pitch_hz: float | None = None
    quality: Quality | None = None  # the recording-guide measures (warnings only)

    @property
    def ok(self) -> bool:
        """True when the sample breaks no rule."""
        return not self.problems

    def rules(self) -> frozenset[str]:
        """The ``rule`` of every problem."""
        return frozenset(p.rule for p in self.problems)


def error_code(report: SampleReport) -> tuple[str, str] | None:
    """(DashScope code, message) the service would answer for ``report``; ``None`` if ok."""
    return ERROR_CODES[report.problems[0].rule] if report.problems else None


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,<data>``: how enrollment sends a local file (§4.2)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def data_uri_size(size: int, mime: str) -> int:
    """Length in bytes of :func:`data_uri` for ``size`` bytes of data, without building it."""
    return len(f"data:{mime};base64,") + 4 * ((size + 2) // 3)


def sniff_container(data: bytes) -> str | None:
    """``"wav"``, ``"mp3"`` or ``"mp4"`` from the leading bytes, or ``None``."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3":
        return "mp3"
    # MPEG audio frame sync: 11 set bits, a valid version (not 01) and layer (not 00).
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        if (data[1] >> 3) & 0x03 != 0x01 and (data[1] >> 1) & 0x03 != 0x00:
            return "mp3"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    return None


# --------------------------------------------------------------------------- decoding


class _DecodeError(Exception):
    pass


@dataclass
class _Audio:
    """Decoded audio: native properties plus mono int16 at the analysis rate."""

    codec: str
    sample_rate: int
    channels: int
    bit_depth: int | None
    duration_s: float
    mono: PCM16 = field(repr=False)
    extra: list[Problem] = field(default_factory=list)  # e.g. a WAV that is not 16-bit PCM


def _wav_chunks(data: bytes) -> tuple[bytes, int, int]:
    """(fmt chunk body, offset of the data chunk body, its declared size) of a RIFF/WAVE file."""
    fmt: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt = data[body : body + size]
        elif cid == b"data":
            if fmt is None:
                raise _DecodeError("WAV data chunk before its fmt chunk")
            return fmt, body, size
        pos = body + size + (size & 1)  # chunks are word-aligned
    raise _DecodeError("WAV file has no " + ("data" if fmt else "fmt") + " chunk")


@dataclass(frozen=True)
class _Header:
    """What the container says before any decoding: rate, channels, duration (0 if unknown),
    and the problems the header alone shows (a WAV that is not 16-bit PCM)."""

    sample_rate: int
    channels: int
    duration_s: float
    extra: tuple[Problem, ...] = ()


def _wav_header(data: bytes, size: int) -> tuple[_Header, tuple[int, int, int], memoryview]:
    """(header, (format tag, block size, bits), the data chunk's bytes present) of a WAV."""
    fmt, start, declared = _wav_chunks(data)
    # Streamed WAVs carry a placeholder size, a path may have been read only in part: clamp
    # to what is there (the duration uses what the whole file holds).
    body = memoryview(data)[start : min(start + declared, len(data))]
    stored = min(declared, size - start)
    if len(fmt) < 16:
        raise _DecodeError("WAV fmt chunk is truncated")
    tag, channels, sample_rate, _, block, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag in the SubFormat
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or sample_rate < 1 or block < 1:
        raise _DecodeError("WAV header has zero channels, rate or block size")
    depth: tuple[Problem, ...] = ()
    plain = block == bits // 8 * channels  # otherwise _decode_wav hands it to PyAV
    if plain and ((tag == 1 and bits in (8, 24, 32)) or (tag == 3 and bits in (32, 64))):
        kind = f"{bits}-bit" + (" float" if tag == 3 else "")
        depth = (Problem("bit_depth", f"WAV must be 16-bit PCM, this one is {kind}", bits, 16),)
    header = _Header(sample_rate, channels, stored // block / sample_rate, depth)
    return header, (tag, block, bits), body


def _probe(data: bytes, container: str, size: int) -> _Header:
    """The container's own rate, channels and duration, without decoding any audio."""
    if container == "wav":
        return _wav_header(data, size)[0]
    import av  # lazy: only compressed samples need FFmpeg

    try:
        with av.open(io.BytesIO(data), "r") as opened:
            if not opened.streams.audio:
                raise _DecodeError("no audio stream")
            stream = opened.streams.audio[0]
            duration = opened.duration / 1e6 if opened.duration else 0.0
            return _Header(int(stream.rate or 0), int(stream.channels or 0), duration)
    except _DecodeError:
        raise
    except Exception as exc:  # PyAV raises many types (FFmpegError, ValueError, ...)
        raise _DecodeError(f"{type(exc).__name__}: {exc}") from exc


def _decode_wav(data: bytes, rate: int, size: int) -> _Audio:
    header, (tag, block, bits), body = _wav_header(data, size)
    sample_rate, channels = header.sample_rate, header.channels
    extra = list(header.extra)
    width = bits // 8
    # Only the analysed span is converted: memory follows _MAX_ANALYSIS_S, not the file.
    most = int(_MAX_ANALYSIS_S * sample_rate)
    if tag == 1 and bits in (8, 16, 24, 32) and block == width * channels:
        codec = f"pcm_{'u' if bits == 8 else 's'}{bits}"
        frames = min(len(body) // block, most)
        raw = np.frombuffer(body[: frames * block], np.uint8).reshape(frames, channels, width)
        if bits == 8:
            x = (raw[..., 0].astype(np.float32) - 128.0) / 128.0
        else:
            # Keep the two most significant bytes: enough for every check made here.
            hi = raw[..., width - 2 :].copy().view("<i2")[..., 0]
            x = hi.astype(np.float32) / 32768.0
    elif tag == 3 and bits in (32, 64) and block == width * channels:
        codec = f"pcm_f{bits}le"
        frames = min(len(body) // block, most)
        x = np.frombuffer(body[: frames * block], f"<f{width}").reshape(frames, channels)
        x = x.astype(np.float32)
    else:
        # ADPCM, mu-law...: not allowed, but PyAV can still decode it for the other checks.
        audio = _decode_av(data, rate, size)
        audio.extra.append(
            Problem("format", f"WAV must hold 16-bit PCM, not codec {audio.codec}", audio.codec,
                    "pcm_s16le")
        )  # fmt: skip
        return audio
    mono = x.mean(axis=1) if channels > 1 else x[:, 0]
    if sample_rate != rate:
        mono = soxr.resample(mono, sample_rate, rate)
    pcm = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    return _Audio(codec, sample_rate, channels, bits, header.duration_s, pcm, extra)


def _s16(frame: Any) -> PCM16:
    return np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1)


def _decode_av(data: bytes, rate: int, size: int) -> _Audio:
    import av  # lazy: only compressed samples need FFmpeg

    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise _DecodeError("no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            out: list[PCM16] = []
            native = 0
            sample_rate = channels = 0
            for frame in container.decode(stream):
                sample_rate, channels = frame.sample_rate, frame.layout.nb_channels
                native += frame.samples
                out += [_s16(f) for f in resampler.resample(frame)]
                if native > _MAX_ANALYSIS_S * sample_rate:
                    break
            out += [_s16(f) for f in resampler.resample(None)]
            codec = stream.codec_context.name
            whole = container.duration / 1e6 if container.duration else 0.0
    except _DecodeError:
        raise
    except Exception as exc:  # PyAV raises many types (FFmpegError, ValueError, ...)
        raise _DecodeError(f"{type(exc).__name__}: {exc}") from exc
    if not native or not sample_rate:
        raise _DecodeError("no audio frames could be decoded")
    duration = max(native / sample_rate, whole if native > _MAX_ANALYSIS_S * sample_rate else 0)
    if len(data) < size:  # read in part: estimate as if the bit rate were constant
        duration *= size / len(data)
    pcm = np.concatenate(out).astype(np.int16, copy=False)
    return _Audio(codec, sample_rate, channels, None, duration, pcm)


def _decode(data: bytes, container: str, rate: int, size: int) -> _Audio:
    if container == "wav":
        return _decode_wav(data, rate, size)
    return _decode_av(data, rate, size)


def decode_mono(data: bytes, rate: int) -> PCM16:
    """Decode a WAV/MP3/M4A file (by content) to int16 mono at ``rate`` (first 61 s at most).

    Raises :class:`~tts_stream.errors.UsageError` when the bytes are no such file.
    """
    container = sniff_container(data)
    if container is None:
        raise UsageError("not a WAV, MP3 or M4A file")
    try:
        return _decode(data, container, rate, len(data)).mono
    except _DecodeError as exc:
        raise UsageError(f"cannot decode the {container} audio: {exc}") from exc


# --------------------------------------------------------------------------- analysis


def _frames(x: npt.NDArray[np.float64], n: int, hop: int) -> npt.NDArray[np.float64]:
    return sliding_window_view(x, n)[::hop]


def _periodicity(
    frames: npt.NDArray[np.float64], rate: int, fmin: float, fmax: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """(normalised autocorrelation peak, its lag) per frame, over lags of fmin..fmax Hz.

    The autocorrelation of the windowed frame is divided by that of the window itself
    (Boersma 1993), so a perfectly periodic frame scores ~1 at any lag, not less at long lags.
    Computed in blocks of :data:`_BLOCK_FRAMES` frames, so memory does not grow with the audio.
    """
    if frames.shape[0] <= _BLOCK_FRAMES:
        return _periodicity_block(frames, rate, fmin, fmax)
    parts = [
        _periodicity_block(frames[i : i + _BLOCK_FRAMES], rate, fmin, fmax)
        for i in range(0, frames.shape[0], _BLOCK_FRAMES)
    ]
    return np.concatenate([p for p, _ in parts]), np.concatenate([lag for _, lag in parts])


def _periodicity_block(
    frames: npt.NDArray[np.float64], rate: int, fmin: float, fmax: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    n = frames.shape[1]
    window = np.hanning(n)
    frames = (frames - frames.mean(axis=1, keepdims=True)) * window
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * n, axis=1)) ** 2, axis=1)[:, :n]
    wac = np.fft.irfft(np.abs(np.fft.rfft(window, 2 * n)) ** 2)[:n]
    energy = ac[:, 0].copy()
    energy[energy <= 0] = np.inf
    lo, hi = int(rate / fmax), min(int(rate / fmin), n // 2)
    lags = np.arange(lo, hi)
    r = ac[:, lo:hi] / energy[:, None] / (wac[lo:hi] / wac[0])
    # A periodic frame correlates as well at 2, 3... periods: a small cost per octave of lag
    # (Boersma's "octave cost") makes the true period win instead of a multiple of it.
    best = np.argmax(r - _OCTAVE_COST * np.log2(lags / lo), axis=1)
    return r[np.arange(r.shape[0]), best], lo + best


def measure_pitch(
    samples: npt.NDArray[np.int16], rate: int, *, fmin: float = 60.0, fmax: float = 400.0
) -> float | None:
    """Median F0 in Hz of the voiced, loud frames (40 ms, 10 ms hop), or ``None`` if unvoiced.

    numpy autocorrelation (research/feasibility.md §2): within 2 % of Praat on speech.
    """
    x = np.asarray(samples, dtype=np.float64) / 32768.0
    if x.ndim == 2:
        x = x.mean(axis=1)
    n, hop = int(0.04 * rate), int(0.01 * rate)
    if x.size < n:
        return None
    frames = _frames(x, n, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    loud = rms >= max(0.005, 0.1 * float(np.percentile(rms, 95)))
    if not loud.any():
        return None
    peak, lag = _periodicity(frames[loud], rate, fmin, fmax)
    voiced = peak > 0.5
    if int(voiced.sum()) < 5:
        return None
    return float(np.median(rate / lag[voiced]))


def _speech_frames(mono: PCM16) -> npt.NDArray[np.bool_]:
    """One flag per 30 ms frame at 16 kHz: webrtcvad says speech and the frame is voiced."""
    n = int(_FRAME_S * _VAD_RATE)
    count = mono.size // n
    if not count:
        return np.zeros(0, bool)
    pcm = np.ascontiguousarray(mono[: count * n])
    vad = webrtcvad.Vad(_VAD_MODE)
    raw = pcm.tobytes()
    step = n * 2
    flags = np.fromiter(
        (vad.is_speech(raw[i * step : (i + 1) * step], _VAD_RATE) for i in range(count)),
        bool,
        count,
    )
    x = pcm.astype(np.float64) / 32768.0
    rms = np.sqrt(np.mean(x.reshape(count, n) ** 2, axis=1))
    # Voicing is judged on 60 ms windows centred on each frame: 30 ms holds too few periods
    # of a low voice (60 Hz) for a reliable autocorrelation.
    padded = np.pad(x, n // 2)
    peak, _ = _periodicity(_frames(padded, 2 * n, n)[:count], _VAD_RATE, 60.0, 400.0)
    voiced = (peak >= _VOICING) & (rms > 10 ** (-55 / 20))
    speech: npt.NDArray[np.bool_] = flags & voiced
    return speech


def _spans(flags: npt.NDArray[np.bool_]) -> list[tuple[float, float]]:
    """(start, end) seconds of each run of True frames."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(s * _FRAME_S, e * _FRAME_S) for s, e in zip(edges[::2], edges[1::2], strict=True)]


def _merge(spans: list[tuple[float, float]], join_s: float) -> list[tuple[float, float]]:
    """Merge spans separated by at most ``join_s`` seconds."""
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= join_s + 1e-9:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class _SpeechStats:
    speech_s: float
    longest_run_s: float
    longest_pause_s: float


def _segments(mono: PCM16) -> list[tuple[float, float]]:
    """The speech segments (seconds) of 16 kHz ``mono``: frames merged, clicks dropped."""
    return [
        (s, e)
        for s, e in _merge(_spans(_speech_frames(mono)), _SEGMENT_GAP_S)
        if e - s >= _MIN_SEGMENT_S
    ]


def _speech_stats(mono: PCM16) -> _SpeechStats:
    segments = _segments(mono)
    if not segments:
        return _SpeechStats(0.0, 0.0, 0.0)
    pauses = [b[0] - a[1] for a, b in zip(segments, segments[1:], strict=False)]
    runs = _merge(segments, _RUN_GAP_S)
    return _SpeechStats(
        speech_s=round(sum(e - s for s, e in segments), 3),
        longest_run_s=round(max(e - s for s, e in runs), 3),
        longest_pause_s=round(max(pauses, default=0.0), 3),
    )


# --------------------------------------------------------------------------- inspection


def _read(source: str | os.PathLike[str] | bytes) -> tuple[bytes, int]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return data, len(data)
    try:
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return f.read(_READ_LIMIT), size
    except OSError as exc:
        raise UsageError(f"cannot read clone sample {os.fspath(source)!r}: {exc}") from exc


def inspect_sample(source: str | os.PathLike[str] | bytes) -> SampleReport:
    """Check a clone sample (a path or the file's bytes) against every rule of §4.7.

    Never raises on bad audio: every violation becomes a :class:`Problem` in the report, with
    its measured value and limit, all at once. Only an unreadable path raises
    :class:`~tts_stream.errors.UsageError`.
    """
    data, size = _read(source)
    problems: list[Problem] = []
    warnings: list[Problem] = []
    container = sniff_container(data)
    mime = _MIME.get(container or "")
    uri_size = data_uri_size(size, mime or "application/octet-stream")
    _size_rules(size, uri_size, problems)
    base = SampleReport(mime=mime, container=container, size_bytes=size, data_uri_bytes=uri_size)
    if container is None:
        problems.append(
            Problem("format", "not a WAV, MP3 or M4A file (unrecognised content)",
                    data[:4].hex() or "empty", "RIFF/WAVE, MP3 or MP4/M4A")
        )  # fmt: skip
        return _finish(base, problems, warnings)
    try:
        # The container's own figures first: a file that says it is too long or has an
        # absurd rate is refused without decoding (decoding it would cost CPU and memory).
        header = _probe(data, container, size)
        if header.sample_rate > MAX_SAMPLE_RATE or header.duration_s > MAX_DURATION_S:
            problems += header.extra
            _format_rules(header, problems, warnings)
            refused = replace(base, sample_rate=header.sample_rate, channels=header.channels,
                              duration_s=round(header.duration_s, 3))  # fmt: skip
            return _finish(refused, problems, warnings)
        audio = _decode(data, container, _VAD_RATE, size)
    except _DecodeError as exc:
        if len(data) < size:  # read in part (already too big): do not blame the decoder
            warnings.append(Problem("decode", f"only the first {len(data)} bytes were read; "
                                    "the audio was not checked", len(data), size))  # fmt: skip
        else:
            problems.append(Problem("decode", f"cannot decode the {container} audio: {exc}",
                                    str(exc), None))  # fmt: skip
        return _finish(base, problems, warnings)
    measured = _audio_rules(base, audio, problems, warnings)
    return _finish(measured, problems, warnings)


def _audio_rules(
    base: SampleReport, audio: _Audio, problems: list[Problem], warnings: list[Problem]
) -> SampleReport:
    """The rules on the decoded audio (format, speech, quality); ``base`` with its figures."""
    problems += audio.extra
    duration = round(audio.duration_s, 3)
    _format_rules(_Header(audio.sample_rate, audio.channels, duration), problems, warnings)
    stats = _speech_stats(audio.mono)
    _speech_rules(stats, problems)
    quality = measure_quality(audio.mono)  # the recording guide's checks: warnings only
    warnings += quality_warnings(quality)
    return replace(
        base,
        quality=quality,
        codec=audio.codec,
        sample_rate=audio.sample_rate,
        channels=audio.channels,
        bit_depth=audio.bit_depth,
        duration_s=duration,
        speech_s=stats.speech_s,
        longest_speech_s=stats.longest_run_s,
        longest_pause_s=stats.longest_pause_s,
        pitch_hz=measure_pitch(audio.mono, _VAD_RATE) if stats.speech_s else None,
    )


def _size_rules(size: int, uri_size: int, problems: list[Problem]) -> None:
    """The size limit, on the file and on the base64 data URI the request carries (§4.7)."""
    if size >= MAX_BYTES:
        problems.append(
            Problem("size", f"file is {size:,} bytes ({size / 2**20:.2f} MiB); it must be "
                    f"under {MAX_BYTES:,} bytes ({MAX_BYTES / 2**20:g} MiB)", size, MAX_BYTES)
        )  # fmt: skip
    if uri_size >= MAX_BYTES:
        problems.append(
            Problem("data_uri_size", f"as a base64 data URI it is {uri_size:,} bytes "
                    f"({uri_size / 2**20:.2f} MiB); it must be under {MAX_BYTES:,} bytes "
                    f"({MAX_BYTES / 2**20:g} MiB)", uri_size, MAX_BYTES)
        )  # fmt: skip


def _speech_rules(stats: _SpeechStats, problems: list[Problem]) -> None:
    """Enough continuous speech, and no pause that is too long."""
    if stats.longest_run_s < MIN_SPEECH_S:
        problems.append(
            Problem("speech", f"longest continuous speech is {stats.longest_run_s:.1f} s; at "
                    f"least {MIN_SPEECH_S:.0f} s is needed", stats.longest_run_s, MIN_SPEECH_S)
        )  # fmt: skip
    if stats.longest_pause_s > MAX_PAUSE_S:
        problems.append(
            Problem("pauses", f"a pause between speech lasts {stats.longest_pause_s:.1f} s; "
                    f"pauses must be at most {MAX_PAUSE_S:.0f} s", stats.longest_pause_s,
                    MAX_PAUSE_S)
        )  # fmt: skip


def _format_rules(header: _Header, problems: list[Problem], warnings: list[Problem]) -> None:
    """The sample-rate, channel and duration rules, on the header's or the decoded figures."""
    rate, duration = header.sample_rate, round(header.duration_s, 3)
    if rate < MIN_SAMPLE_RATE:
        problems.append(
            Problem("sample_rate", f"sample rate is {rate} Hz; it must be at least "
                    f"{MIN_SAMPLE_RATE} Hz", rate, MIN_SAMPLE_RATE)
        )  # fmt: skip
    elif rate > MAX_SAMPLE_RATE:
        problems.append(
            Problem("sample_rate", f"sample rate is {rate} Hz; no recording has more than "
                    f"{MAX_SAMPLE_RATE} Hz", rate, MAX_SAMPLE_RATE)
        )  # fmt: skip
    if header.channels != 1:
        problems.append(
            Problem("channels", f"audio has {header.channels} channels; it must be mono",
                    header.channels, 1)
        )  # fmt: skip
    lo, hi = RECOMMENDED_DURATION_S
    if duration > MAX_DURATION_S:
        problems.append(
            Problem("duration", f"duration is {duration:.1f} s; the maximum is "
                    f"{MAX_DURATION_S:.0f} s", duration,
                    MAX_DURATION_S)
        )  # fmt: skip
    elif not lo <= duration <= hi:
        warnings.append(
            Problem("duration", f"duration is {duration:.1f} s; {lo:.0f}–{hi:.0f} s is "
                    "recommended", duration, f"{lo:.0f}-{hi:.0f}")
        )  # fmt: skip


def _finish(base: SampleReport, problems: list[Problem], warnings: list[Problem]) -> SampleReport:
    ordered = sorted(problems, key=lambda p: _RULE_ORDER[p.rule])  # stable sort
    report = replace(base, problems=tuple(ordered), warnings=tuple(warnings))
    logger.debug("sample inspected: ok=%s rules=%s", report.ok, sorted(report.rules()))
    return report


# --------------------------------------------------------------------------- recording quality
#
# The hard rules above decide whether the service accepts a sample; these measure how well it
# was recorded, against the product documentation's recording guide (a small quiet room with
# soft surfaces, a microphone about 10 cm away, no music, no other voices). They only warn
# (``tts-stream check --strict`` makes them block). Every measure runs on the same 16 kHz mono
# analysis signal and the same 30 ms speech frames as the hard rules.

SNR_MIN_DB: Final = 25.0
"""Warn below this signal-to-noise ratio (speech level over the noise between the words)."""
CLIPPED_MAX_SHARE: Final = 0.001
"""Warn when more than this share of the samples sits at full scale (0.1 %)."""
LEVEL_MIN_DBFS: Final = -35.0
"""Warn when the speech level (RMS of the speech frames) is below this."""
DECAY_MAX_S: Final = 0.45
"""Warn when the decay after speech offsets, extrapolated to 60 dB, is longer than this."""
DC_MAX: Final = 0.01
"""Warn when the mean of the samples is more than this share of full scale (1 %)."""
STEADY_MAX_SHARE: Final = 0.35
"""Warn (music or singing) when more of the voiced time than this holds a steady pitch."""
SPEAKER_GAP_ST: Final = 6.0
"""Warn (another voice) when the speech splits into two pitch groups this many semitones apart."""

_FULL_SCALE: Final = 32767 * 0.985  # resampling to 16 kHz rounds a clipped plateau's edges
_ENV_HOP_S: Final = 0.01
_DECAY_WINDOW_S: Final = 0.15
_STEADY_S: Final = 0.25  # a held note: the pitch stays within 1 semitone this long
_STEADY_ST: Final = 1.0


@dataclass(frozen=True)
class Quality:
    """How well a sample was recorded; ``None`` where there was too little to measure.

    Levels are dBFS (0 = full scale); ``clipped_share`` and ``dc_offset`` are fractions (of the
    samples, of full scale); ``decay_s`` is the reverberation estimate (an RT60-like time);
    ``steady_pitch_share`` the share of voiced time on a held pitch; ``pitch_groups_hz`` the two
    pitch groups when the speech splits into two voices.
    """

    speech_level_dbfs: float | None = None
    noise_floor_dbfs: float | None = None
    snr_db: float | None = None
    peak_dbfs: float | None = None
    clipped_share: float = 0.0
    dc_offset: float = 0.0
    decay_s: float | None = None
    decay_offsets: int = 0
    steady_pitch_share: float | None = None
    pitch_groups_hz: tuple[float, float] | None = None


def _db(power: float) -> float:
    return round(10.0 * float(np.log10(max(power, 1e-10))), 1)  # -100 dBFS floor


def measure_quality(mono: PCM16, rate: int = _VAD_RATE) -> Quality:
    """Measure ``mono`` (int16 at ``rate``, 16 kHz for the speech frames) for :class:`Quality`."""
    x = np.asarray(mono, dtype=np.float64) / 32768.0
    if rate != _VAD_RATE:
        mono = np.clip(np.round(soxr.resample(x, rate, _VAD_RATE) * 32768), -32768, 32767)
        mono = mono.astype(np.int16)
        x = mono.astype(np.float64) / 32768.0
    if not x.size:
        return Quality()
    peak = float(np.max(np.abs(x)))
    base = Quality(
        peak_dbfs=_db(peak * peak),
        clipped_share=round(float(np.mean(np.abs(mono.astype(np.int32)) >= _FULL_SCALE)), 5),
        dc_offset=round(float(np.mean(x)), 4),
    )
    flags = _speech_frames(mono)
    n = int(_FRAME_S * _VAD_RATE)
    if not flags.any():
        return base
    power = np.mean((x[: flags.size * n] - base.dc_offset).reshape(-1, n) ** 2, axis=1)
    speech_p = float(np.mean(power[flags]))
    quiet = power[~flags]
    noise_p = float(np.percentile(quiet, 10)) if quiet.size >= 5 else float(np.min(power))
    decay, offsets = _decay(x - base.dc_offset, noise_p)
    steady, groups = _pitch_profile(x - base.dc_offset, flags)
    return replace(
        base,
        speech_level_dbfs=_db(speech_p),
        noise_floor_dbfs=_db(noise_p),
        snr_db=round(_db(max(speech_p - noise_p, 1e-10)) - _db(noise_p), 1),
        decay_s=decay,
        decay_offsets=offsets,
        steady_pitch_share=steady,
        pitch_groups_hz=groups,
    )


def _envelope(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Level in dB of 20 ms windows every 10 ms."""
    hop = int(_ENV_HOP_S * _VAD_RATE)
    if x.size < 2 * hop:
        return np.zeros(0)
    frames = _frames(x, 2 * hop, hop)
    env: npt.NDArray[np.float64] = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
    return env


def _decay(x: npt.NDArray[np.float64], noise_p: float) -> tuple[float | None, int]:
    """RT60-like decay time: how fast the level can fall, from the fastest free decays.

    Speech cannot fall silent faster than the room lets its sound die away, so the fastest
    declines of the level envelope (20 ms windows, 10 ms hop) show the room's decay rate
    (the idea behind blind reverberation-time estimation, e.g. Ratnam et al. 2003, reduced to
    its simplest form). Every 150 ms stretch that starts at least 30 dB above the noise floor,
    ends at least 5 dB above it and falls by 10 dB or more is fitted with a line; its slope,
    scaled to 60 dB, is one decay time; the estimate is the 10th percentile of those (the
    fastest declines, not a single outlier). Needs 10 such stretches; with a noise floor
    within 35 dB of the speech there is no room to measure, and the result is ``None``.
    """
    env = _envelope(x)
    floor = 10 * np.log10(max(noise_p, 1e-10))
    w = int(_DECAY_WINDOW_S / _ENV_HOP_S)
    if env.size < w:
        return None, 0
    win = sliding_window_view(env, w)
    t = np.arange(w) * _ENV_HOP_S
    t -= t.mean()
    slope = (win - win.mean(axis=1, keepdims=True)) @ t / float(t @ t)  # dB per second
    start, end = win[:, 0], win[:, -1]
    falling = (start >= floor + 30) & (end >= floor + 5) & (start - end >= 10) & (slope < 0)
    if int(falling.sum()) < 10:
        return None, int(falling.sum())
    times = -60.0 / slope[falling]
    return round(float(np.percentile(times, 10)), 2), int(falling.sum())


def _pitch_profile(
    x: npt.NDArray[np.float64], flags: npt.NDArray[np.bool_]
) -> tuple[float | None, tuple[float, float] | None]:
    """(share of voiced time on a steady harmonic pitch, two pitch groups in Hz or ``None``).

    A pitch track (40 ms frames, 10 ms hop, the autocorrelation of :func:`measure_pitch`) over
    the speech frames. Steady: a 250 ms stretch of voiced frames whose pitch stays within one
    semitone and whose periodicity averages at least 0.9 (strongly harmonic), which a held
    sung note or an instrument produces and reading aloud rarely does (spoken pitch glides
    within a syllable; breath and room make it less periodic). Two groups: the median pitch
    of every 0.5 s of voiced speech, split into two groups by :func:`_two_groups`.
    """
    n, hop = int(0.04 * _VAD_RATE), int(_ENV_HOP_S * _VAD_RATE)
    if x.size < n:
        return None, None
    frames = _frames(x, n, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    peak, lag = _periodicity(frames, _VAD_RATE, 60.0, 400.0)
    inside = np.repeat(flags, int(_FRAME_S / _ENV_HOP_S))[: peak.size]
    inside = np.pad(inside, (0, peak.size - inside.size))
    voiced = inside & (peak > 0.5) & (rms >= max(0.003, 0.05 * float(np.percentile(rms, 95))))
    if int(voiced.sum()) < 20:
        return None, None
    semis = 12 * np.log2(_VAD_RATE / lag / 100.0)
    w = int(_STEADY_S / _ENV_HOP_S)
    steady = np.zeros(voiced.size, bool)
    if voiced.size >= w:
        win_s = sliding_window_view(semis, w)
        held = (
            sliding_window_view(voiced, w).all(axis=1)
            & (win_s.max(axis=1) - win_s.min(axis=1) <= _STEADY_ST)
            & (sliding_window_view(peak, w).mean(axis=1) >= 0.9)
        )
        for i in np.flatnonzero(held):
            steady[i : i + w] = True
    share = round(float(steady.sum() / voiced.sum()), 3)
    voiced_semis = semis[voiced]
    block = int(0.5 / _ENV_HOP_S)
    medians = [
        float(np.median(voiced_semis[i : i + block]))
        for i in range(0, voiced_semis.size - block + 1, block)
    ]
    return share, _two_groups(medians)


def _two_groups(medians: list[float]) -> tuple[float, float] | None:
    """Two pitch groups (Hz) when the block medians (semitones) split cleanly, else ``None``.

    The split is Otsu's: the one that maximises the variance between the groups, among
    those leaving each group a fifth of the blocks; it counts when the group means are
    :data:`SPEAKER_GAP_ST` apart and each group's spread is under a quarter of that gap.
    """
    m = np.sort(np.asarray(medians))
    least = max(2, int(np.ceil(m.size / 5)))
    if m.size < 2 * least:
        return None
    ks = np.arange(least, m.size - least + 1)
    between = [k * (m.size - k) * (m[k:].mean() - m[:k].mean()) ** 2 for k in ks]
    k = int(ks[int(np.argmax(between))])
    low, high = m[:k], m[k:]
    gap = float(high.mean() - low.mean())
    if gap < SPEAKER_GAP_ST or max(float(low.std()), float(high.std())) > gap / 4:
        return None
    hz = (100.0 * 2 ** (float(low.mean()) / 12), 100.0 * 2 ** (float(high.mean()) / 12))
    return round(hz[0], 1), round(hz[1], 1)


def quality_warnings(q: Quality) -> list[Problem]:
    """One warning per measure of ``q`` outside its limit, with the recording guide's advice."""
    out: list[Problem] = []
    if q.snr_db is not None and q.snr_db < SNR_MIN_DB:
        out.append(Problem(
            "snr", f"signal-to-noise ratio is {q.snr_db:.0f} dB (noise floor "
            f"{q.noise_floor_dbfs:.0f} dBFS); at least {SNR_MIN_DB:.0f} dB is advised: record in "
            "a quiet room with doors and windows shut, air conditioning and fans off",
            q.snr_db, SNR_MIN_DB))  # fmt: skip
    if q.clipped_share > CLIPPED_MAX_SHARE:
        out.append(Problem(
            "clipping", f"{100 * q.clipped_share:.2f} % of the samples are clipped at full "
            f"scale (at most {100 * CLIPPED_MAX_SHARE:.1f} %); lower the input gain or move a "
            "little further from the microphone", q.clipped_share, CLIPPED_MAX_SHARE))  # fmt: skip
    if q.speech_level_dbfs is not None and q.speech_level_dbfs < LEVEL_MIN_DBFS:
        out.append(Problem(
            "level", f"speech level is {q.speech_level_dbfs:.0f} dBFS, too low (at least "
            f"{LEVEL_MIN_DBFS:.0f} dBFS); speak about 10 cm from the microphone or raise the "
            "input gain", q.speech_level_dbfs, LEVEL_MIN_DBFS))  # fmt: skip
    if q.decay_s is not None and q.decay_s > DECAY_MAX_S:
        out.append(Problem(
            "reverb", f"the room echoes: sound takes about {q.decay_s:.1f} s to die away after "
            f"speech (at most {DECAY_MAX_S:.1f} s); record in a small room (under 10 m²) with "
            "soft surfaces (curtains, carpet, furniture)", q.decay_s, DECAY_MAX_S))  # fmt: skip
    if abs(q.dc_offset) > DC_MAX:
        out.append(Problem(
            "dc_offset", f"the signal has a DC offset of {100 * q.dc_offset:+.1f} % of full "
            f"scale (at most {100 * DC_MAX:.0f} %); the microphone or its interface is faulty or "
            "badly set: try another input", q.dc_offset, DC_MAX))  # fmt: skip
    if q.steady_pitch_share is not None and q.steady_pitch_share > STEADY_MAX_SHARE:
        out.append(Problem(
            "music", f"{100 * q.steady_pitch_share:.0f} % of the voiced sound holds a steady "
            f"pitch (speech: under {100 * STEADY_MAX_SHARE:.0f} %): this sounds like music or "
            "singing; read full sentences in a natural tone, with no music playing",
            q.steady_pitch_share, STEADY_MAX_SHARE))  # fmt: skip
    if q.pitch_groups_hz is not None:
        lo, hi = q.pitch_groups_hz
        out.append(Problem(
            "speakers", f"the speech splits into two voices, around {lo:.0f} Hz and {hi:.0f} Hz: "
            "record one speaker only, with no other voices in the room",
            f"{lo:.0f}/{hi:.0f} Hz", f"{SPEAKER_GAP_ST:.0f} semitones"))  # fmt: skip
    return out


def speech_span(samples: PCM16, rate: int) -> tuple[float, float] | None:
    """(start, end) in seconds from the first to the last speech segment, as the hard rules see
    them (webrtcvad plus the pitch test, clicks ignored); ``None`` when there is no speech.

    ``tts-stream record`` trims the silence outside this span.
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1) / 32768.0
    if rate != _VAD_RATE:
        x = soxr.resample(x, rate, _VAD_RATE)
    mono = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
    segments = _segments(mono)
    if not segments:
        return None
    return segments[0][0], segments[-1][1]
