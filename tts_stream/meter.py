"""The live recording meter and its screen: samples in, status out, text out. PURE.

Role: ``tts-stream record`` feeds every block the microphone delivers into a :class:`Meter`
and draws :func:`render` (a terminal) or :func:`progress_line` (piped output) from its
:class:`LiveStatus`. Time is the count of samples fed, never a clock. What the meter shows
follows the recording guide of the voice-enrollment documentation: the input level with a
clipping marker, the noise floor of a short silent lead-in, the current continuous-speech
run against the 3 s rule, pauses against the 2 s rule, the elapsed time against 10–20 s,
and a script to read.

Speech is detected live by level alone (a 30 ms frame 12 dB over the lead-in's noise floor
and above -50 dBFS), merged with the same gaps as the final check
(:mod:`tts_stream.samples`: 0.3 s within a segment, 0.5 s within a run): a guide for the
reader. The check run on the finished file (webrtcvad plus a pitch test) is the judge.

Boundary: numpy and the rule constants of :mod:`tts_stream.samples`; no I/O, no asyncio,
no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tts_stream.samples import (
    _RUN_GAP_S,
    _SEGMENT_GAP_S,
    MAX_PAUSE_S,
    MIN_SPEECH_S,
    RECOMMENDED_DURATION_S,
)

__all__ = ["SCRIPTS", "LiveStatus", "Meter", "progress_line", "render", "script_for"]

_FRAME_S = 0.03
_SPEECH_OVER_FLOOR_DB = 12.0
_SPEECH_MIN_DBFS = -50.0
_CLIP_LEVEL = 32767 * 0.99
_CLIP_HOLD_S = 1.0  # the clipping marker stays lit this long after a clipped sample
_METER_DB = 60.0  # the level bar spans -60..0 dBFS

SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "Hi, it's me. I'm recording a short sample so the system can learn my voice.",
        "Yesterday I walked along the river, and the morning was calm and bright.",
        "Could you call me back this evening? I'd love to hear how your trip went.",
    ),
    "zh": (
        "你好，我正在录一段声音，让系统学习我的声音。",
        "昨天我沿着河边散步，早上的天气又晴朗又安静。",
        "你今天晚上能给我回个电话吗？我很想听听你的旅行。",
    ),
    "de": (
        "Hallo, ich bin's. Ich nehme gerade eine kurze Probe auf, damit das System meine Stimme lernt.",  # noqa: E501
        "Gestern bin ich am Fluss spazieren gegangen, und der Morgen war ruhig und hell.",
        "Kannst du mich heute Abend zurückrufen? Ich möchte hören, wie deine Reise war.",
    ),
    "it": (
        "Ciao, sono io. Sto registrando un breve campione perché il sistema impari la mia voce.",
        "Ieri ho passeggiato lungo il fiume, e la mattina era calma e luminosa.",
        "Mi richiami stasera? Vorrei proprio sapere com'è andato il tuo viaggio.",
    ),
    "pt": (
        "Olá, sou eu. Estou gravando uma amostra curta para o sistema aprender a minha voz.",
        "Ontem caminhei ao longo do rio, e a manhã estava calma e clara.",
        "Você pode me ligar hoje à noite? Quero muito saber como foi a sua viagem.",
    ),
    "es": (
        "Hola, soy yo. Estoy grabando una muestra corta para que el sistema aprenda mi voz.",
        "Ayer paseé junto al río, y la mañana estaba tranquila y luminosa.",
        "¿Me llamas esta noche? Tengo muchas ganas de saber cómo fue tu viaje.",
    ),
    "ja": (
        "こんにちは、私です。システムに声を覚えてもらうため、短いサンプルを録音しています。",
        "昨日は川沿いを散歩しました。朝は静かで、とても明るかったです。",
        "今晩、折り返し電話をもらえますか？旅行の話をぜひ聞きたいです。",
    ),
    "ko": (
        "안녕하세요, 저예요. 시스템이 제 목소리를 배울 수 있도록 짧은 샘플을 녹음하고 있어요.",
        "어제는 강을 따라 산책했는데, 아침이 조용하고 밝았어요.",
        "오늘 저녁에 다시 전화해 줄래요? 여행이 어땠는지 정말 듣고 싶어요.",
    ),
    "fr": (
        "Bonjour, c'est moi. J'enregistre un court extrait pour que le système apprenne ma voix.",
        "Hier, je me suis promené le long de la rivière, et la matinée était calme et claire.",
        "Tu peux me rappeler ce soir ? J'aimerais beaucoup savoir comment s'est passé ton voyage.",
    ),
    "ru": (
        "Привет, это я. Я записываю короткий образец, чтобы система выучила мой голос.",
        "Вчера я гулял вдоль реки, и утро было тихим и светлым.",
        "Перезвонишь мне сегодня вечером? Очень хочу услышать, как прошла твоя поездка.",
    ),
}
"""A few conversational sentences to read, per language of the service (10–20 s aloud)."""


def script_for(language: str) -> tuple[str, ...]:
    """The script for ``language`` (``"en"``, ``"zh"``, ...); unknown codes list the known."""
    try:
        return SCRIPTS[language.lower().split("-")[0]]
    except KeyError:
        raise ValueError(
            f"no script for language {language!r}; known: {', '.join(SCRIPTS)} "
            "(or give your own with --script FILE)"
        ) from None


@dataclass(frozen=True)
class LiveStatus:
    """A snapshot of the meter; times in seconds of audio, levels in dBFS."""

    rate: int
    recorded_s: float  # everything fed, lead-in included
    lead_in_s: float
    level_dbfs: float  # RMS of the last frame
    peak_dbfs: float  # peak of the last frame
    clipping: bool  # a sample at full scale within the last second
    clipped_samples: int
    noise_floor_dbfs: float | None  # None until the lead-in is over
    speaking: bool
    run_s: float  # the current continuous-speech run (0 when not in one)
    longest_run_s: float
    pause_s: float  # the current pause (0 while speaking or before the first word)
    longest_pause_s: float  # between words, trailing silence excluded
    speech_s: float

    @property
    def in_lead_in(self) -> bool:
        return self.recorded_s < self.lead_in_s

    @property
    def elapsed_s(self) -> float:
        """Time since the lead-in ended (what counts towards 10–20 s)."""
        return max(0.0, self.recorded_s - self.lead_in_s)


@dataclass
class Meter:
    """Feed int16 mono blocks of any size with :meth:`feed`; read :meth:`status`."""

    rate: int
    lead_in_s: float = 1.0
    _n: int = 0  # samples fed
    _frame: npt.NDArray[np.float64] = field(init=False, repr=False)
    _fill: int = 0
    _lead: list[float] = field(default_factory=list, repr=False)  # lead-in frame powers
    _floor_db: float | None = None
    _level_db: float = -100.0
    _peak_db: float = -100.0
    _clipped: int = 0
    _last_clip: int | None = None
    _speech_frames: int = 0
    _last_speech_end: int | None = None  # sample index after the last speech frame
    _run_start: int | None = None
    _longest_run: int = 0
    _longest_pause: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.lead_in_s < 0:
            raise ValueError("rate must be > 0 and lead_in_s >= 0")
        self._frame = np.zeros(int(self.rate * _FRAME_S))

    def feed(self, block: npt.NDArray[np.int16]) -> None:
        """Account for ``block`` (1-D int16, the next samples of the recording)."""
        x = np.asarray(block).reshape(-1)
        pos, size, n = 0, self._frame.size, int(x.size)
        while pos < n:
            take = min(size - self._fill, n - pos)
            self._frame[self._fill : self._fill + take] = x[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == size:
                self._n += size
                self._fill = 0
                self._on_frame(self._frame)

    def _on_frame(self, f: npt.NDArray[np.float64]) -> None:
        end = self._n  # sample index just after this frame
        power = float(np.mean((f / 32768.0) ** 2))
        self._level_db = _db(power)
        peak = float(np.max(np.abs(f)))
        self._peak_db = _db((peak / 32768.0) ** 2)
        clipped = int(np.count_nonzero(np.abs(f) >= _CLIP_LEVEL))
        if clipped:
            self._clipped += clipped
            self._last_clip = end
        if end <= self.lead_in_s * self.rate:
            self._lead.append(power)
            return
        if self._floor_db is None:
            self._floor_db = _db(float(np.median(self._lead))) if self._lead else -100.0
        threshold = max(self._floor_db + _SPEECH_OVER_FLOOR_DB, _SPEECH_MIN_DBFS)
        if self._level_db < threshold:
            return
        start = end - f.size
        self._speech_frames += 1
        last = self._last_speech_end
        if last is None or start - last > _RUN_GAP_S * self.rate:
            self._run_start = start
        if last is not None and start - last > _SEGMENT_GAP_S * self.rate:
            self._longest_pause = max(self._longest_pause, start - last)
        self._last_speech_end = end
        assert self._run_start is not None
        self._longest_run = max(self._longest_run, end - self._run_start)

    def status(self) -> LiveStatus:
        """The current snapshot (pure: the same feeds give the same status)."""
        r, now = self.rate, self._n
        last = self._last_speech_end
        silence = now - last if last is not None else 0
        start = self._run_start
        in_run = last is not None and start is not None and silence <= _RUN_GAP_S * r
        run = last - start if in_run and last is not None and start is not None else 0
        pause = silence if last is not None and silence > _SEGMENT_GAP_S * r else 0
        return LiveStatus(
            rate=r,
            recorded_s=now / r,
            lead_in_s=self.lead_in_s,
            level_dbfs=self._level_db,
            peak_dbfs=self._peak_db,
            clipping=self._last_clip is not None and now - self._last_clip < _CLIP_HOLD_S * r,
            clipped_samples=self._clipped,
            noise_floor_dbfs=self._floor_db,
            speaking=last is not None and silence <= _SEGMENT_GAP_S * r,
            run_s=run / r,
            longest_run_s=self._longest_run / r,
            pause_s=pause / r,
            longest_pause_s=self._longest_pause / r,
            speech_s=self._speech_frames * self._frame.size / r,
        )


def _db(power: float) -> float:
    return round(10.0 * math.log10(max(power, 1e-10)), 1)


# -- text out ---------------------------------------------------------------------------------


def _bar(fraction: float, width: int, fill: str = "#", empty: str = ".") -> str:
    k = max(0, min(width, int(round(fraction * width))))
    return fill * k + empty * (width - k)


def render(
    s: LiveStatus, *, script: tuple[str, ...] = (), target: str = "", limit_s: float | None = None
) -> list[str]:
    """The live screen for ``s``: a list of lines (no colours, no cursor codes)."""
    lo, hi = RECOMMENDED_DURATION_S
    limit = hi if limit_s is None else limit_s
    lines = [f"Recording {target}".rstrip() + "    (press Enter to stop)"]
    level = _bar((s.level_dbfs + _METER_DB) / _METER_DB, 30)
    clip = "  CLIP! lower the gain" if s.clipping else ""
    lines.append(f"level      [{level}] {s.level_dbfs:6.1f} dBFS{clip}")
    if s.in_lead_in:
        lines.append(f"noise      stay quiet: measuring the room "
                     f"({s.lead_in_s - s.recorded_s:.1f} s)")  # fmt: skip
        lines.append("speech run -")
        lines.append("pause      -")
        lines.append(f"elapsed    0.0 s of {lo:.0f}-{hi:.0f} s")
    else:
        floor = s.noise_floor_dbfs if s.noise_floor_dbfs is not None else -100.0
        verdict = "quiet" if floor <= -50 else "noisy: shut doors and windows, fans off"
        lines.append(f"noise      {floor:6.1f} dBFS ({verdict})")
        ok = "ok" if s.longest_run_s >= MIN_SPEECH_S else f"need {MIN_SPEECH_S:.0f} s"
        lines.append(f"speech run {s.run_s:4.1f} s  longest {s.longest_run_s:4.1f} s  "
                     f"[>= {MIN_SPEECH_S:.0f} s: {ok}]")  # fmt: skip
        long_pause = max(s.pause_s, s.longest_pause_s)
        ok = "ok" if long_pause <= MAX_PAUSE_S else "too long: keep reading"
        lines.append(f"pause      {s.pause_s:4.1f} s  longest {s.longest_pause_s:4.1f} s  "
                     f"[<= {MAX_PAUSE_S:.0f} s: {ok}]")  # fmt: skip
        e = s.elapsed_s
        state = "keep going" if e < lo else ("good: press Enter" if e < hi else "done")
        lines.append(f"elapsed    {e:4.1f} s of {lo:.0f}-{hi:.0f} s "
                     f"[{_bar(e / limit, 20, '=', ' ')}] {state}")  # fmt: skip
    if script:
        lines.append("")
        lines.append("Read aloud, in full sentences and a natural tone:")
        lines += [f"  {line}" for line in script]
    return lines


def progress_line(s: LiveStatus) -> str:
    """One plain line for piped output (no terminal)."""
    if s.in_lead_in:
        return f"recording {s.recorded_s:4.1f} s: lead-in, stay quiet"
    floor = s.noise_floor_dbfs if s.noise_floor_dbfs is not None else -100.0
    clip = ", CLIPPING" if s.clipping else ""
    return (
        f"recording {s.elapsed_s:4.1f} s: level {s.level_dbfs:.0f} dBFS{clip}, noise "
        f"{floor:.0f} dBFS, speech run {s.run_s:.1f} s (longest {s.longest_run_s:.1f}), "
        f"pause {s.pause_s:.1f} s (longest {s.longest_pause_s:.1f})"
    )
