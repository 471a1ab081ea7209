"""Sound-card scenarios, each run in a fresh process by ``tests.audio_env.run_scenario``.

PortAudio reads the ALSA configuration once, in ``Pa_Initialize`` (at ``import sounddevice``
or ``PyAudio()``), so a test that points ``ALSA_CONFIG_PATH`` at a file device or a PulseAudio
daemon runs its scenario here, in a new interpreter with that environment. Usage::

    python -m tests.soundcard_runner '{"scenario": "play", ...}'

The last stdout line is a JSON object with the results (stats, timings, device rate); the
calling test checks them and the recording. Signals are passed as ``.npy`` files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from sinks.soundcard import SoundCardSink, list_output_devices
from tts_stream.audio import AudioFormat, Frame

__all__ = ["main"]


def _sink(spec: dict[str, Any]) -> SoundCardSink:
    return SoundCardSink(
        spec.get("device"),
        backend=spec.get("backend", "sounddevice"),
        prefill_ms=spec.get("prefill_ms", 80.0),
        ring_ms=spec.get("ring_ms", 2000.0),
        blocksize=spec.get("blocksize"),
        device_rate=spec.get("device_rate"),
        fade_ms=spec.get("fade_ms", 5.0),
        tail_ms=spec.get("tail_ms", 100.0),
    )


def _chunks(n: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Cut ``n`` samples into consecutive ranges, cycling through ``sizes``."""
    out, pos, i = [], 0, 0
    while pos < n:
        step = sizes[i % len(sizes)]
        out.append((pos, min(n, pos + step)))
        pos += step
        i += 1
    return out


async def _write_all(
    sink: SoundCardSink,
    x: np.ndarray,
    sizes: list[int],
    *,
    pace_rate: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Write ``x`` in chunks; with ``pace_rate``, at most as fast as real time."""
    start = time.monotonic()
    for a, b in _chunks(x.size, sizes):
        if stop is not None and stop.is_set():
            return  # the producer stops feeding on barge-in
        if pace_rate:
            due = start + a / pace_rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        await sink.write(Frame(x[a:b], offset=a))


async def _until(cond: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll ``cond`` every 10 ms (a condition, not a sleep for synchronisation), bounded."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {within} s")
        await asyncio.sleep(0.01)


async def _trace(sink: SoundCardSink, points: list[tuple[float, int]]) -> None:
    """Sample (monotonic time, samples played) every 50 ms until cancelled."""
    while True:
        points.append((time.monotonic(), sink.stats().samples_played))
        await asyncio.sleep(0.05)


async def _play(sink: SoundCardSink, spec: dict[str, Any], signals: list[Any],
                sizes: list[int], result: dict[str, Any]) -> None:  # fmt: skip
    # Each signal is one utterance: write it all, then drain.
    result["utterances"] = []
    for x in signals:
        points: list[tuple[float, int]] = []
        ts = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            tracer = tg.create_task(_trace(sink, points))
            await _write_all(sink, x, sizes, pace_rate=spec.get("pace_rate"))
            tw = time.monotonic()
            await sink.drain()
            td = time.monotonic()
            tracer.cancel()
        result["utterances"].append(
            {"start": ts, "written": tw, "drained": td, "trace": points,
             "stats": asdict(sink.stats())}
        )


async def _starve(sink: SoundCardSink, spec: dict[str, Any], signals: list[Any],
                  sizes: list[int], result: dict[str, Any]) -> None:  # fmt: skip
    # Half the signal, then no writes until the sink reports starvation, then the rest.
    x = signals[0]
    half = x.size // 2
    await _write_all(sink, x[:half], sizes)
    result["underruns_before_gap"] = sink.stats().underruns
    tg0 = time.monotonic()
    await _until(lambda: sink.stats().underruns > 0, within=10, what="an underrun")
    result["gap_s"] = time.monotonic() - tg0
    await _write_all(sink, x[half:], sizes)
    await sink.drain()


async def _interrupt(sink: SoundCardSink, spec: dict[str, Any], signals: list[Any],
                     sizes: list[int], result: dict[str, Any]) -> None:  # fmt: skip
    # A writer keeps the ring full; once the card has played `interrupt_after_s`,
    # another task interrupts while that writer is blocked on back-pressure (barge-in).
    rate = spec.get("rate", 24000)
    x = signals[0]
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_write_all(sink, x, sizes, stop=stop))
        await _until(
            lambda: sink.stats().samples_played >= spec["interrupt_after_s"] * rate,
            within=10, what="playback progress",
        )
        ti = time.monotonic()
        stop.set()
        played = await sink.interrupt()
        result["interrupt_s"] = time.monotonic() - ti
        result["interrupt_returned"] = played
    result["stats_after_interrupt"] = asdict(sink.stats())
    if len(signals) > 1:
        # The sink stays usable: the next utterance plays normally.
        await _write_all(sink, signals[1], sizes)
        await sink.drain()


async def _devices(sink: SoundCardSink, spec: dict[str, Any], signals: list[Any],
                   sizes: list[int], result: dict[str, Any]) -> None:  # fmt: skip
    result["devices"] = [asdict(d) for d in list_output_devices(backend=sink.backend)]


_SCENARIOS = {"play": _play, "starve": _starve, "interrupt": _interrupt, "devices": _devices}


async def _open_error(sink: SoundCardSink, rate: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    try:
        await sink.open(AudioFormat(sample_rate=rate))
    except Exception as exc:
        result["error"] = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        await sink.aclose()
    return result


async def _scenario(spec: dict[str, Any]) -> dict[str, Any]:
    rate = spec.get("rate", 24000)
    sink = _sink(spec)
    signals = [np.load(p) for p in spec.get("signals", [])]
    sizes = spec.get("chunks", [480])
    scenario = spec["scenario"]
    t0 = time.monotonic()
    if scenario == "open_error":
        return await _open_error(sink, rate)
    result: dict[str, Any] = {}
    await sink.open(AudioFormat(sample_rate=rate))
    result["device_rate"] = sink.device_rate
    result["device"] = sink.device_info.name if sink.device_info else None
    t_open = time.monotonic()
    try:
        run = _SCENARIOS.get(scenario)
        if run is None:
            raise SystemExit(f"unknown scenario {scenario!r}")
        await run(sink, spec, signals, sizes, result)
    finally:
        await sink.aclose()
    result.update(t0=t0, t_open=t_open, t_closed=time.monotonic(), stats=asdict(sink.stats()))
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    with contextlib.redirect_stdout(sys.stderr):  # keep the JSON line the only stdout
        result = asyncio.run(asyncio.wait_for(_scenario(spec), spec.get("timeout", 45)))
    print(json.dumps(result))  # noqa: T201 - the runner's output channel
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
