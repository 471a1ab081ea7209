"""Drive one Pipecat TTS service through a live pipeline, turn by turn (bench/frameworks.py).

Imports only Pipecat and the standard library, so the same code measures tts-stream's
service in the project's venv and ``pipecat-dashscope``'s in its own venv (it pins
``websockets<16``). A :class:`Driver` runs ``Pipeline([service, Recorder])`` in a real
``PipelineWorker`` and, per turn, queues ``LLMFullResponseStartFrame``, one
``LLMTextFrame`` per text and ``LLMFullResponseEndFrame``, the way an LLM service does; the
:class:`Recorder` right after the service stamps every frame leaving it with
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for both processes).

* ``turn``: ``ttfb_ms`` = first ``LLMTextFrame`` queued → first ``TTSAudioRawFrame`` out
  of the service; also Pipecat's own ``TTFBMetricsData`` and the audio duration.
* ``bargein``: a long turn, an ``InterruptionFrame`` ``after_s`` seconds after its first
  audio; ``last_audio_ms`` = interruption queued → last audio frame of that turn out of the
  service (0 when none came after it), ``interruption_ms`` = interruption queued → the
  ``InterruptionFrame`` out of the service (where a transport stops playing).

As a script (the community side)::

    VENV/bin/python bench/pipecat_turns.py dashscope --ws-url WS --model M --voice V

(key in ``TTS_STREAM_BENCH_KEY``) reads one JSON command per line on stdin
(``{"op": "turn", "texts": [...]}``, ``{"op": "bargein", "texts": [...], "after_s": 0.5}``)
and answers one JSON line each; it stops at end of input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from typing import Any

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

KEY_ENV = "TTS_STREAM_BENCH_KEY"
TURN_TIMEOUT_S = 120.0


class Recorder(FrameProcessor):
    """Stamps every downstream frame as it leaves the service (direct mode: no queue hop)."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)
        self.seen: list[tuple[float, Frame]] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            self.seen.append((time.monotonic(), frame))
            self.changed.set()
        await self.push_frame(frame, direction)

    async def wait_for(self, kind: type[Frame], since: int, within: float) -> float:
        """When the first ``kind`` frame at or after index ``since`` was seen (bounded)."""
        async with asyncio.timeout(within):
            while True:
                for t, f in self.seen[since:]:
                    if isinstance(f, kind):
                        return t
                self.changed.clear()
                await self.changed.wait()


class Driver:
    """A running pipeline around one TTS service; use ``async with``."""

    def __init__(self, service: FrameProcessor) -> None:
        self.recorder = Recorder()
        self.worker = PipelineWorker(
            Pipeline([service, self.recorder]),
            params=PipelineParams(enable_metrics=True),
            idle_timeout_secs=None,  # turns come when the benchmark says, not on a timer
            cancel_on_idle_timeout=False,
        )
        self._runner = WorkerRunner()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Driver:
        started = asyncio.Event()

        async def _started(worker: Any, frame: Any) -> None:
            started.set()

        self.worker.add_event_handler("on_pipeline_started", _started)
        await self._runner.add_workers(self.worker)
        self._task = asyncio.get_running_loop().create_task(self._runner.run())
        async with asyncio.timeout(30):
            await started.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.worker.queue_frame(EndFrame())
        if self._task is not None:
            try:
                async with asyncio.timeout(30):
                    await self._task
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def _send_texts(self, texts: list[str]) -> float:
        await self.worker.queue_frame(LLMFullResponseStartFrame())
        t_first = 0.0
        for i, text in enumerate(texts):
            if i == 0:
                t_first = time.monotonic()
            await self.worker.queue_frame(LLMTextFrame(text))
        return t_first

    def _audio(self, since: int) -> list[tuple[float, TTSAudioRawFrame]]:
        return [(t, f) for t, f in self.recorder.seen[since:] if isinstance(f, TTSAudioRawFrame)]

    async def turn(self, texts: list[str]) -> dict[str, Any]:
        mark = len(self.recorder.seen)
        t_first = await self._send_texts(texts)
        await self.worker.queue_frame(LLMFullResponseEndFrame())
        await self.recorder.wait_for(LLMFullResponseEndFrame, mark, TURN_TIMEOUT_S)
        audio = self._audio(mark)
        pipecat_ttfb = [
            d.value
            for _, f in self.recorder.seen[mark:]
            if isinstance(f, MetricsFrame)
            for d in f.data
            if isinstance(d, TTFBMetricsData) and d.value > 0
        ]
        return {
            "ttfb_ms": (audio[0][0] - t_first) * 1000 if audio else None,
            "pipecat_ttfb_ms": pipecat_ttfb[0] * 1000 if pipecat_ttfb else None,
            "audio_ms": sum(len(f.audio) / (2 * f.sample_rate) for _, f in audio) * 1000,
            "frames": len(audio),
        }

    async def bargein(self, texts: list[str], after_s: float) -> dict[str, Any]:
        mark = len(self.recorder.seen)
        t_first = await self._send_texts(texts)
        t_audio = await self.recorder.wait_for(TTSAudioRawFrame, mark, TURN_TIMEOUT_S)
        await asyncio.sleep(max(0.0, t_audio + after_s - time.monotonic()))
        t_int = time.monotonic()
        await self.worker.queue_frame(InterruptionFrame())
        t_seen = await self.recorder.wait_for(InterruptionFrame, mark, 10.0)
        await asyncio.sleep(0.5)  # anything still coming out of the service shows up now
        await self.worker.queue_frame(LLMFullResponseEndFrame())
        await self.recorder.wait_for(LLMFullResponseEndFrame, mark, TURN_TIMEOUT_S)
        audio = self._audio(mark)
        last = max(t for t, _ in audio)
        return {
            "ttfb_ms": (t_audio - t_first) * 1000,
            "last_audio_ms": max(0.0, last - t_int) * 1000,
            "interruption_ms": (t_seen - t_int) * 1000,
            "late_frames": sum(1 for t, _ in audio if t > t_seen),
        }


def dashscope_service(args: argparse.Namespace) -> FrameProcessor:
    """pipecat-dashscope's DashScopeQwenRealtimeTTSService, on the local server."""
    import pipecat_dashscope.tts as community
    from dashscope.audio.qwen_tts_realtime import QwenTtsRealtime

    # The service has no URL option (it always dials the cloud): bind the SDK class it
    # uses to the local server's URL. Nothing else of the service is touched.
    community.QwenTtsRealtime = functools.partial(QwenTtsRealtime, url=args.ws_url)
    service: FrameProcessor = community.DashScopeQwenRealtimeTTSService(
        api_key=os.environ[KEY_ENV], model=args.model, voice=args.voice
    )
    return service


async def serve(service: FrameProcessor) -> None:
    """Answer the JSON commands on stdin with one JSON line each, until end of input."""
    loop = asyncio.get_running_loop()
    async with Driver(service) as driver:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "turn":
                out = await driver.turn(cmd["texts"])
            elif cmd["op"] == "bargein":
                out = await driver.bargein(cmd["texts"], cmd["after_s"])
            else:
                raise SystemExit(f"unknown op {cmd['op']!r}")
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("service", choices=["dashscope"])
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--voice", required=True)
    args = parser.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(serve(dashscope_service(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
