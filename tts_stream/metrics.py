"""Per-utterance latency records and their summaries (time is an argument; no asyncio here).

Role: a :class:`Recorder` is created for every utterance (so nothing carries over from the
previous one, the flaw of peers that time only the first request) and is told, with
timestamps from one monotonic clock, what happened: connection acquired, first text sent,
``response.created``, each delta, ``response.done``. :meth:`Recorder.snapshot` freezes that
into an :class:`UtteranceMetrics`. Definitions (protocol.md §5.11):

* ``first_audio_ms``: first text sent → first ``response.audio.delta`` received (TTFB; the
  official SDK's "first audio delay");
* ``response_created_ms``: first text sent → first ``response.created`` (shows the server's
  segmentation wait in ``server_commit`` mode);
* ``first_voiced_ms``: first text sent → arrival of the delta holding the first non-silent
  sample (``audio.first_voiced_index``); ``leading_silence_ms`` is that sample's position;
* ``sink_first_sample_ms``: first text sent → the sink's own ``SinkStats.first_sample_at``;
* gaps between deltas *within* a response (``max_gap_ms``, ``p95_gap_ms``), real-time factor
  (``synthesis_ms / audio_ms``), underruns and drops from sink stats, billed characters
  (sum of ``usage.characters``), and ``server_lag_ms_*``: delta receive time minus the
  server's ``x_sent_monotonic`` stamp when present (the engine's own added latency).

Summaries (:func:`summarize`, :func:`summarize_records`) and JSON-lines export are pure
functions over records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from .audio import PCM16, SinkStats, first_voiced_index
from .protocol import Tally

__all__ = [
    "AcquireInfo",
    "History",
    "Observer",
    "Recorder",
    "Summary",
    "UtteranceMetrics",
    "percentile",
    "read_jsonl",
    "summarize",
    "summarize_records",
    "to_jsonl",
    "write_jsonl",
]

#: Called once per finished utterance with its record and ``{sink name: sink kind}``.
Observer = Callable[["UtteranceMetrics", Mapping[str, str]], None]

_GAP_RES = 0.1  # ms: gap histogram resolution (memory stays bounded on any utterance length)
_FOLD_AT = 1024  # deltas buffered before they are binned (8 kB of floats per buffer)
_NAN = math.nan
_BREAK = (_NAN,)


@dataclass(frozen=True)
class AcquireInfo:
    """How the connection of an utterance was obtained (the pool records it per acquire)."""

    acquire_ms: float
    was_warm: bool
    spare_age_s: float | None = None


@dataclass(frozen=True)
class UtteranceMetrics:
    """Everything measured about one utterance. Times in milliseconds from first text sent."""

    model: str = ""
    voice: str = ""
    mode: str = ""
    sample_rate: int = 0
    acquire_ms: float | None = None
    was_warm: bool | None = None
    spare_age_s: float | None = None
    text_chars: int = 0
    billed_characters: int = 0
    responses: int = 0
    response_created_ms: float | None = None
    first_audio_ms: float | None = None
    first_voiced_ms: float | None = None
    leading_silence_ms: float | None = None
    sink_first_sample_ms: Mapping[str, float] = field(default_factory=dict)
    deltas: int = 0
    audio_ms: float = 0.0
    synthesis_ms: float | None = None
    rtf: float | None = None
    max_gap_ms: float | None = None
    p95_gap_ms: float | None = None
    underruns: int = 0
    dropped_samples: int = 0
    server_lag_ms_p50: float | None = None
    server_lag_ms_max: float | None = None
    retries: int = 0
    resumes: int = 0  # sessions resumed after a loss after audio (on_loss="resume")
    lost_chars: int = 0  # characters of the sentences those losses cut (heard in part)
    interrupted: bool = False
    error: str | None = None
    started_at: float = 0.0  # monotonic time the utterance began (before acquire)
    first_text_at: float | None = None  # monotonic time the first text was sent

    @property
    def ttfb_ms(self) -> float | None:
        """Alias of :attr:`first_audio_ms`."""
        return self.first_audio_ms

    @property
    def characters(self) -> int:
        """Alias of :attr:`billed_characters` (sum of ``usage.characters``)."""
        return self.billed_characters

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sink_first_sample_ms"] = dict(self.sink_first_sample_ms)
        return d

    def to_json(self) -> str:
        return orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UtteranceMetrics:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (b - a) * 1000.0


class Recorder:
    """Collects one utterance's timestamps (all from the caller's monotonic clock)."""

    def __init__(
        self, *, model: str = "", voice: str = "", mode: str = "", sample_rate: int = 24000,
        started_at: float = 0.0,
    ) -> None:  # fmt: skip
        self.model, self.voice, self.mode, self.sample_rate = model, voice, mode, sample_rate
        self.started_at = started_at
        self.acquire: AcquireInfo | None = None
        self.first_text_at: float | None = None
        self.text_chars = 0
        self.response_created_at: float | None = None
        self.first_delta_at: float | None = None
        self.last_delta_at: float | None = None
        self.first_voiced_at: float | None = None
        self.first_voiced_sample: int | None = None
        self.samples = 0
        # Responses finished and characters billed over every session of the utterance (a
        # retry's too: the service bills them); deltas of the audio that counts.
        self.tally = Tally()
        self.retries = 0
        self.resumes = 0
        self.lost_chars = 0
        self.interrupted = False
        self.error: str | None = None
        # Histograms of the gaps between deltas within a response and of the server lag,
        # folded in batches (:meth:`_fold`): per delta only its time (NaN: a response began
        # or ended, no gap across it) and its lag are appended to a buffer of floats.
        self._gaps: Counter[int] = Counter()
        self._max_gap = 0.0
        self._lags: Counter[int] = Counter()
        self._max_lag: float | None = None
        self._times = array("d", _BREAK)  # unfolded delta times; [0]: the one before them
        self._lag_ms = array("d")  # unfolded server lags (ms)

    def acquired(self, info: AcquireInfo) -> None:
        if self.acquire is None:  # a retry's re-acquire does not hide the first one
            self.acquire = info

    def text_sent(self, now: float, chars: int) -> None:
        if self.first_text_at is None:
            self.first_text_at = now
        self.text_chars += chars

    def response_created(self, now: float) -> None:
        if self.response_created_at is None:
            self.response_created_at = now
        self._times.append(_NAN)  # no gap across a response start

    @property
    def deltas(self) -> int:
        return self.tally.deltas

    @property
    def responses(self) -> int:
        return self.tally.responses

    @property
    def billed(self) -> int:
        return self.tally.billed_characters

    def response_done(self, characters: int | None) -> None:
        self.tally.response_done(characters)
        self._times.append(_NAN)

    def delta(self, now: float, samples: PCM16, *, server_sent_at: float | None = None) -> None:
        """A delta arrived at ``now`` (its samples already decoded).

        The hot path (every delta of every stream): the gap and lag histograms only buffer
        the time and the lag here; :meth:`_fold` bins them per batch, with the same float
        arithmetic as binning one at a time (tests/test_metrics.py checks the equality).
        """
        if self.first_delta_at is None:
            self.first_delta_at = now
        if self.first_voiced_at is None:
            idx = first_voiced_index(samples)
            if idx is not None:
                self.first_voiced_at = now
                self.first_voiced_sample = self.samples + idx
        times = self._times
        times.append(now)
        self.last_delta_at = now
        self.samples += len(samples)
        self.tally.deltas += 1
        if server_sent_at is not None:
            self._lag_ms.append((now - server_sent_at) * 1000.0)
        if len(times) > _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Bin the buffered gaps and lags into the histograms (bounded memory: every
        :data:`_FOLD_AT` deltas, and before a snapshot)."""
        times = self._times
        if len(times) > 1:
            t = np.frombuffer(times, np.float64)
            gaps = (t[1:] - t[:-1]) * 1000.0  # a NaN on either side: no gap
            gaps = gaps[~np.isnan(gaps)]
            if gaps.size:
                self._max_gap = max(self._max_gap, float(gaps.max()))
                _count(self._gaps, gaps)
            self._times = array("d", times[-1:])
        lags = self._lag_ms
        if lags:
            lag = np.frombuffer(lags, np.float64)
            top = float(lag.max())
            self._max_lag = top if self._max_lag is None else max(self._max_lag, top)
            _count(self._lags, np.maximum(lag, 0.0))
            self._lag_ms = array("d")

    def forget_audio(self) -> None:
        """A retry replays the text on a fresh session: nothing of the failed one counts."""
        self.retries += 1
        self.text_chars = 0  # the replay sends the text again
        self.first_delta_at = self.last_delta_at = self.first_voiced_at = None
        self.response_created_at = None
        self.first_voiced_sample = None
        self.samples = self.tally.deltas = 0
        self._times.append(_NAN)

    def snapshot(self, sinks: Mapping[str, SinkStats] | None = None) -> UtteranceMetrics:
        self._fold()
        sinks = sinks or {}
        t0 = self.first_text_at
        audio_ms = self.samples * 1000.0 / self.sample_rate if self.sample_rate else 0.0
        synthesis_ms = _ms(t0, self.last_delta_at)
        return UtteranceMetrics(
            model=self.model,
            voice=self.voice,
            mode=self.mode,
            sample_rate=self.sample_rate,
            acquire_ms=self.acquire.acquire_ms if self.acquire else None,
            was_warm=self.acquire.was_warm if self.acquire else None,
            spare_age_s=self.acquire.spare_age_s if self.acquire else None,
            text_chars=self.text_chars,
            billed_characters=self.billed,
            responses=self.responses,
            response_created_ms=_ms(t0, self.response_created_at),
            first_audio_ms=_ms(t0, self.first_delta_at),
            first_voiced_ms=_ms(t0, self.first_voiced_at),
            leading_silence_ms=(
                self.first_voiced_sample * 1000.0 / self.sample_rate
                if self.first_voiced_sample is not None and self.sample_rate
                else None
            ),
            sink_first_sample_ms={
                name: ms
                for name, st in sinks.items()
                if (ms := _ms(t0, st.first_sample_at)) is not None
            },
            deltas=self.deltas,
            audio_ms=audio_ms,
            synthesis_ms=synthesis_ms,
            rtf=(synthesis_ms / audio_ms) if synthesis_ms is not None and audio_ms else None,
            max_gap_ms=self._max_gap if self._gaps else None,
            p95_gap_ms=_hist_quantile(self._gaps, 0.95),
            underruns=sum(st.underruns for st in sinks.values()),
            dropped_samples=sum(st.dropped_samples for st in sinks.values()),
            server_lag_ms_p50=_hist_quantile(self._lags, 0.50),
            server_lag_ms_max=self._max_lag,
            retries=self.retries,
            resumes=self.resumes,
            lost_chars=self.lost_chars,
            interrupted=self.interrupted,
            error=self.error,
            started_at=self.started_at,
            first_text_at=t0,
        )


def _count(hist: Counter[int], ms: npt.NDArray[np.float64]) -> None:
    """Add ``ms`` (milliseconds, not negative) to ``hist`` in buckets of :data:`_GAP_RES`:
    ``int(x / _GAP_RES)`` of each, the truncation of the conversion to int64."""
    buckets, counts = np.unique((ms / _GAP_RES).astype(np.int64), return_counts=True)
    for bucket, n in zip(buckets.tolist(), counts.tolist(), strict=True):
        hist[bucket] += n


def _hist_quantile(hist: Counter[int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = q * (total - 1)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen > rank:
            return (bucket + 0.5) * _GAP_RES
    return (max(hist) + 0.5) * _GAP_RES


# --- summaries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Distribution of one quantity over many records (``None`` values are left out)."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` in [0, 100] of already sorted values."""
    if not sorted_values:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be within [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Iterable[float | None]) -> Summary:
    """p50/p95/p99/max/mean of the non-``None`` values."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return Summary(0, None, None, None, None, None)
    return Summary(
        count=len(vals),
        mean=sum(vals) / len(vals),
        p50=percentile(vals, 50),
        p95=percentile(vals, 95),
        p99=percentile(vals, 99),
        max=vals[-1],
    )


SUMMARY_FIELDS = (
    "acquire_ms", "response_created_ms", "first_audio_ms", "first_voiced_ms", "max_gap_ms",
    "rtf", "server_lag_ms_p50",
)  # fmt: skip


def summarize_records(
    records: Iterable[UtteranceMetrics], fields: Sequence[str] = SUMMARY_FIELDS
) -> dict[str, Summary]:
    """:func:`summarize` of each named field over ``records``."""
    recs = list(records)
    return {name: summarize(getattr(r, name) for r in recs) for name in fields}


def to_jsonl(records: Iterable[UtteranceMetrics]) -> str:
    """One JSON object per line."""
    return "".join(r.to_json() + "\n" for r in records)


def write_jsonl(path: str | os.PathLike[str], records: Iterable[UtteranceMetrics]) -> None:
    """Append ``records`` to ``path`` as JSON lines."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(to_jsonl(records))


def read_jsonl(path: str | os.PathLike[str]) -> list[UtteranceMetrics]:
    """Read records written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as fh:
        return [UtteranceMetrics.from_dict(orjson.loads(line)) for line in fh if line.strip()]


class History:
    """The last ``maxlen`` records (bounded), as the engine keeps them."""

    def __init__(self, maxlen: int = 1000) -> None:
        self._records: deque[UtteranceMetrics] = deque(maxlen=maxlen)

    def add(self, record: UtteranceMetrics) -> None:
        self._records.append(record)

    def __iter__(self) -> Iterator[UtteranceMetrics]:
        return iter(tuple(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def summary(self, fields: Sequence[str] = SUMMARY_FIELDS) -> dict[str, Summary]:
        return summarize_records(self._records, fields)
