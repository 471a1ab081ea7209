"""The ``tts-stream`` command: a thin composition root over the library and the sinks.

Subcommands mirror the API: ``serve``, ``check``, ``voices create|list|delete``, ``speak``,
``demo`` and ``devices``. Secrets come from the environment (``DASHSCOPE_API_KEY``) only.
With no API key and no ``--base-url``, ``speak``, ``voices`` and ``demo`` start the local
server inside this process (the embedded default), keeping voices under the data directory.
Errors print one line (``-v`` adds the traceback); exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .environment import API_KEY_ENV, LOCAL_KEY_PREFIX, default_data_dir
from .errors import TtsStreamError, UsageError
from .messages import VC_MODELS

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["main"]

log = logging.getLogger(__name__)

#: Key of the embedded local server: voices created through it belong to this key.
EMBEDDED_API_KEY = LOCAL_KEY_PREFIX + "embedded"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tts-stream",
        description="Voice-cloned real-time speech over the DashScope Qwen-TTS Realtime API.",
    )
    p.add_argument("--version", action="version", version=f"tts-stream {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    target = _target_options()
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(sub)

    c = sub.add_parser("check", help="check a clone sample locally (no network)")
    c.add_argument("sample", type=Path)
    c.add_argument("--strict", action="store_true", help="fail on quality warnings too")

    _add_voices_parsers(sub, target)

    sp = sub.add_parser("speak", parents=[target], help="speak text with a cloned voice")
    sp.add_argument("voice", help="voice name (as printed by `voices create`)")
    sp.add_argument("text", help="text to speak, or - to read stdin")
    sp.add_argument("--model", default=None, help="default: the voice's target model")
    sp.add_argument("--mode", choices=["server_commit", "commit"], default="server_commit")
    sp.add_argument("--rate", type=int, default=None, help="sample rate (default 24000)")
    _add_sink_options(sp)

    d = sub.add_parser("demo", help="clone a voice and speak on the embedded local server")
    d.add_argument("--out", type=Path, default=Path("demo.wav"))
    d.add_argument("--no-play", action="store_true", help="do not use the sound card")
    d.add_argument("--data-dir", type=Path, default=None)

    _add_ivr_parser(sub, target)

    dv = sub.add_parser("devices", help="list sound-card output (or --input) devices")
    dv.add_argument("--backend", choices=["sounddevice", "pyaudio"], default="sounddevice")
    dv.add_argument("--input", action="store_true", help="list input devices (microphones)")
    _add_record_parsers(sub, target)
    return p


def _target_options() -> argparse.ArgumentParser:
    """The options naming the service, shared by every subcommand that talks to one."""
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--base-url", help="service base URL, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--region", choices=["intl", "cn"], default=None, help="DashScope region (default intl)"
    )
    target.add_argument("--workspace", help="DashScope workspace id")
    target.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data of the embedded server (default: $TTS_STREAM_DATA or ~/.local/share/tts-stream)",
    )
    return target


def _add_serve_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the local DashScope-compatible server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; any other is reachable from the network, "
        "in plain HTTP: a warning is printed)",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backend", choices=["piper", "espeak", "tone"], default=None,
                   help="speech backend (default: piper when installed, else espeak)")
    s.add_argument("--pacing", choices=["burst", "realtime"], default="burst")
    s.add_argument("--data-dir", type=Path, default=None)
    s.add_argument("--api-key", help="accept this key (default: $DASHSCOPE_API_KEY or generated)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (same --host)")  # fmt: skip


def _add_voices_parsers(sub: Any, target: argparse.ArgumentParser) -> None:
    v = sub.add_parser("voices", help="create, list or delete cloned voices")
    vsub = v.add_subparsers(dest="voices_command", required=True, metavar="ACTION")
    vc = vsub.add_parser("create", parents=[target], help="clone a voice from a sample")
    vc.add_argument("sample", help="WAV/MP3/M4A file, or an http(s) URL")
    vc.add_argument("--name", required=True, help="preferred_name: [A-Za-z0-9_]{1,16}")
    vc.add_argument("--model", default=VC_MODELS[0], choices=VC_MODELS, help="target model")
    vc.add_argument("--text", help="transcript of the sample")
    vc.add_argument("--language", help="language of the sample (zh, en, ...)")
    vc.add_argument("--strict", action="store_true", help="refuse on quality warnings too")
    vl = vsub.add_parser("list", parents=[target], help="list every voice")
    vl.add_argument("--page-size", type=int, default=100)
    vd = vsub.add_parser("delete", parents=[target], help="delete voices")
    vd.add_argument("voice", nargs="+")
    vd.add_argument("--missing-ok", action="store_true")


def _add_sink_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wav", type=Path, help="write a WAV file")
    p.add_argument("--play", action="store_true", help="play on the sound card")
    p.add_argument("--device", help="sound-card device index or name")
    p.add_argument("--audio-backend", choices=["sounddevice", "pyaudio"], default="sounddevice")
    p.add_argument("--rtp", metavar="HOST:PORT", help="send RTP to HOST:PORT")
    p.add_argument("--codec", choices=["pcmu", "pcma", "l16"], default="pcmu")
    p.add_argument("--sdp", type=Path, help="write the RTP stream's SDP to this file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (TtsStreamError, OSError) as exc:
        if args.verbose:
            log.exception("failed")
        print(f"tts-stream: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .server import run_serve
        from .server.synth import default_backend

        key = args.api_key or os.environ.get(API_KEY_ENV)
        backend = args.backend or default_backend()
        return run_serve(
            host=args.host, port=args.port, backend=backend, pacing=args.pacing,
            data_dir=args.data_dir or default_data_dir(), api_key=key,
            metrics_port=args.metrics_port,
        )  # fmt: skip
    if args.command == "check":
        return _check(args.sample, args.strict)
    if args.command == "devices":
        return _input_devices(args.backend) if args.input else _devices(args.backend)
    if args.command in ("record", "enroll"):
        return _record_command(args)
    if args.command == "demo":
        from ._demo import run_demo

        return _run(run_demo(out=args.out, play=not args.no_play,
                             data_dir=args.data_dir or default_data_dir()))  # fmt: skip
    # The subcommands that talk to a service (the real one, --base-url or the embedded server).
    through_engine = {"voices": _voices, "speak": _speak, "ivr": _ivr}
    if args.command not in through_engine:
        raise AssertionError(args.command)
    return _run(through_engine[args.command](args))


def _run(coro: Any) -> int:
    from . import run

    result = run(coro)
    return int(result or 0)


def _measured(value: float | None, spec: str, unit: str = "", label: str = "") -> str | None:
    """``label value unit`` with ``value`` formatted by ``spec``; None when not measured."""
    return None if value is None else f"{label}{value:{spec}}{unit}"


def _check(path: Path, strict: bool = False) -> int:
    from .samples import inspect_sample

    report = inspect_sample(path)
    # An undecodable file has no measurements (None): print only what was measured.
    parts = [
        _measured(report.sample_rate, "d", " Hz"),
        _measured(report.channels, "d", " ch"),
        _measured(report.duration_s, ".1f", " s"),
        _measured(report.longest_speech_s, ".1f", " s", "longest speech "),
        _measured(report.longest_pause_s, ".1f", " s", "longest pause "),
    ]
    known = ", ".join(x for x in parts if x is not None)
    print(f"{path}: {report.container or 'no recognised audio'}" + (f" {known}" if known else ""))
    print(_quality_line(report))
    for w in report.warnings:
        print(f"  warning: {w.message}")
    for pr in report.problems:
        print(f"  problem: {pr.message}")
    print("OK: ready to clone" if report.ok else "REJECTED: fix the problems above")
    return _verdict(report, strict)


def _devices(backend: str) -> int:
    from sinks.soundcard import list_output_devices

    return _print_devices(list_output_devices(backend=backend), "output")


@dataclass(frozen=True)
class _Target:
    base_url: str | None
    api_key: str | None


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace) -> AsyncIterator[_Target]:
    """The service to talk to: the real one, a given base URL, or the embedded local server."""
    key = os.environ.get(API_KEY_ENV)
    if key or args.base_url:
        yield _Target(args.base_url, key)
        return
    if args.region or args.workspace:
        raise UsageError(
            f"{API_KEY_ENV} is not set: export it to use the DashScope service "
            "(or drop --region/--workspace to use the local server)"
        )
    from .server import LocalServer
    from .server.synth import default_backend

    data_dir = args.data_dir or default_data_dir()
    backend = default_backend()
    async with LocalServer(data_dir=data_dir, api_key=EMBEDDED_API_KEY, backend=backend) as srv:
        log.info("embedded local server at %s (%s backend, data in %s)", srv.base_url,
                 backend, data_dir)
        yield _Target(srv.base_url, srv.api_key)


#: On SIGTERM, how long the speech in flight may take to finish before it is interrupted.
SIGTERM_DRAIN_S = 30.0


@contextlib.asynccontextmanager
async def _engine(args: argparse.Namespace) -> AsyncIterator[Engine]:
    """An Engine on the service ``_target`` picks (real, given base URL, or embedded).

    SIGTERM (a process manager stopping us) runs ``engine.shutdown()``: no new speech, the
    speech in flight drains (up to ``SIGTERM_DRAIN_S``), then the pool closes.
    """
    from .engine import Engine

    async with _target(args) as t, Engine(
        api_key=t.api_key, base_url=t.base_url, region=args.region or "intl",
        workspace=args.workspace,
    ) as engine:  # fmt: skip
        term = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Signal handlers exist only on the main thread (``main()`` may run in a worker
        # thread when embedded, as the tests do): elsewhere SIGTERM stays the caller's.
        handles_term = threading.current_thread() is threading.main_thread()
        if handles_term:
            loop.add_signal_handler(signal.SIGTERM, term.set)

        body = asyncio.current_task()
        inside = True  # the command's body still runs (a server or an IVR never ends alone)

        async def on_term() -> None:
            await term.wait()
            log.warning("SIGTERM: finishing the speech in flight, then closing")
            await engine.shutdown(drain_timeout=SIGTERM_DRAIN_S)
            if inside and body is not None:
                body.cancel()  # then end the command itself

        # Owned by this block and awaited below (a TaskGroup would wrap the body's errors).
        watcher = loop.create_task(on_term(), name="tts-stream-sigterm")
        try:
            yield engine
        except asyncio.CancelledError:
            if not (term.is_set() and body is not None and body.cancelling()):
                raise
            body.uncancel()  # ended by SIGTERM after the drain: a normal exit
        finally:
            inside = False
            if handles_term:
                loop.remove_signal_handler(signal.SIGTERM)
            if not term.is_set():
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _voices(args: argparse.Namespace) -> int:
    async with _engine(args) as engine:
        if args.voices_command == "create":
            _precheck(args.sample, args.strict)
            voice = await engine.voices.create(
                args.sample, preferred_name=args.name, target_model=args.model,
                text=args.text, language=args.language,
            )  # fmt: skip
            print(voice.name)
            if voice.fallback_mode:
                print(f"warning: created in fallback mode ({voice.fallback_reason})",
                      file=sys.stderr)  # fmt: skip
        elif args.voices_command == "list":
            n = 0
            async for v in engine.voices.all(page_size=args.page_size):
                print(f"{v.name}\t{v.target_model or ''}\t{v.created or ''}")
                n += 1
            print(f"{n} voice(s)", file=sys.stderr)
        else:
            for name in args.voice:
                await engine.voices.delete(name, missing_ok=args.missing_ok)
                print(f"deleted {name}")
    return 0


def build_sinks(args: argparse.Namespace) -> list[Any]:
    """The sinks asked for on the command line (any combination at once)."""
    out: list[Any] = []
    if args.wav:
        from sinks import WavSink

        out.append(WavSink(args.wav))
    if args.play:
        from sinks.soundcard import SoundCardSink

        device: int | str | None = args.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        out.append(SoundCardSink(device, backend=args.audio_backend))
    if args.rtp:
        from sinks.rtp import RtpSink

        host, _, port = args.rtp.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--rtp wants HOST:PORT, got {args.rtp!r}")
        # L16 runs at the session's rate; give it now so the SDP can be written before open.
        clock = (getattr(args, "rate", None) or 24000) if args.codec == "l16" else None
        rtp = RtpSink(host, int(port), codec=args.codec, clock_rate=clock)
        if args.sdp:
            args.sdp.write_text(rtp.sdp())
        out.append(rtp)
    if not out:
        raise UsageError("no sink: give --wav FILE, --play and/or --rtp HOST:PORT")
    return out


async def _speak(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise UsageError("nothing to say: the text is empty")
    sinks = build_sinks(args)
    session: dict[str, Any] = {}
    if args.rate:
        session["sample_rate"] = args.rate
    async with _engine(args) as engine:
        voice = await engine.voices.find(args.voice)
        async with engine.speak(voice, sinks=sinks, model=args.model, mode=args.mode,
                                **session) as speech:  # fmt: skip
            await speech.push(text)
        m = speech.metrics
    first = _measured(m.first_audio_ms, ".1f", " ms") or "none (no audio came back)"
    print(f"first audio {first}, audio {m.audio_ms / 1000:.2f} s, "
          f"{m.billed_characters} billed characters", file=sys.stderr)  # fmt: skip
    return 0


# -- ivr: answer SIP calls and speak a script (tts_stream.telephony) ---------------------------

IVR_GREETING = "Hello. You are speaking with a cloned voice. Press any key, and I will repeat it."


def _add_ivr_parser(sub: Any, target: argparse.ArgumentParser) -> None:
    iv = sub.add_parser("ivr", parents=[target], help="answer SIP calls and speak a script")
    iv.add_argument("voice", help="voice name (as printed by `voices create`)")
    iv.add_argument("--listen", default="127.0.0.1:5060", metavar="HOST:PORT",
                    help="SIP over UDP (default 127.0.0.1:5060)")  # fmt: skip
    iv.add_argument("--advertise", help="address for Contact/SDP (default: the listen host)")
    iv.add_argument("--script", type=Path, help="text file: one prompt per line (# comments)")
    iv.add_argument("--model", default=None, help="default: the voice's target model")
    iv.add_argument("--max-calls", type=int, default=1000, help="more get 486 Busy Here")
    iv.add_argument("--max-seconds", type=float, default=None, help="stop after this long")


def _ivr_prompts(args: argparse.Namespace) -> list[str]:
    if args.script is None:
        return [IVR_GREETING]
    try:
        lines = args.script.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --script {args.script}: {exc}") from exc
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--script {args.script} has no prompt (one per line)")
    return prompts


async def _ivr(args: argparse.Namespace) -> int:
    import asyncio

    from .telephony import Call, SipAgent

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen wants HOST:PORT, got {args.listen!r}")
    prompts = _ivr_prompts(args)
    speak: dict[str, Any] = {"model": args.model} if args.model else {}

    async def script(call: Call) -> None:
        for prompt in prompts:
            await call.say(prompt, **speak)  # a key or the caller's voice skips ahead
        async for digit in call.dtmf(wait_s=3600):
            await call.say(f"You pressed {digit}.", **speak)

    def ended(r: Any) -> None:
        first = "-" if r.first_audio_ms is None else f"{r.first_audio_ms:.1f} ms"
        print(f"call {r.call_id} ({r.ended_by}): first audio {first}, "
              f"digits {''.join(r.digits) or '-'}", flush=True)  # fmt: skip

    async with _engine(args) as engine:
        voice = await engine.voices.find(args.voice)
        async with SipAgent(
            engine, voice, script, host=host, port=int(port), advertise=args.advertise,
            max_calls=args.max_calls,
        ) as agent:
            agent.on_call_end = ended
            print(f"ivr: answering SIP calls on {agent.address[0]}:{agent.address[1]} (UDP) "
                  f"with voice {args.voice}", flush=True)  # fmt: skip
            if args.max_seconds is None:
                await agent.serve_forever()
            else:
                await asyncio.sleep(args.max_seconds)
    return 0


# -- record, enroll, input devices -------------------------------------------------------------


def _add_record_parsers(sub: Any, target: argparse.ArgumentParser) -> None:
    mic = argparse.ArgumentParser(add_help=False)
    mic.add_argument("--device", help="input device index or name (see `devices --input`)")
    mic.add_argument("--seconds", type=float, default=None,
                     help="stop after this many seconds (default and maximum: 20)")  # fmt: skip
    mic.add_argument("--rate", type=int, default=24000, help="sample rate (>= 24000)")
    mic.add_argument("--audio-backend", choices=["sounddevice", "pyaudio"], default="sounddevice")
    mic.add_argument("--lead-in", type=float, default=1.0,
                     help="seconds of silence first, to measure the noise floor")  # fmt: skip
    mic.add_argument("--script", type=Path, help="text file to read aloud instead of ours")
    mic.add_argument("--strict", action="store_true", help="fail on quality warnings too")
    r = sub.add_parser("record", parents=[mic], help="record a clone sample from a microphone")
    r.add_argument("out", type=Path, help="WAV file to write")
    r.add_argument("--language", default="en", help="language of the script to read (en, zh, "
                   "de, it, pt, es, ja, ko, fr, ru)")  # fmt: skip
    e = sub.add_parser("enroll", parents=[mic, target],
                       help="record (or take) a sample, check it and clone the voice")  # fmt: skip
    e.add_argument("sample", nargs="?", type=Path, help="an existing sample (default: record one)")
    e.add_argument("--name", required=True, help="preferred_name: [A-Za-z0-9_]{1,16}")
    e.add_argument("--out", type=Path, default=None, help="where to record (default NAME.wav)")
    e.add_argument("--model", default=VC_MODELS[0], choices=VC_MODELS, help="target model")
    e.add_argument("--text", help="transcript of the sample")
    e.add_argument("--language", default="en", help="language of the script and the sample")


def _input_devices(backend: str) -> int:
    from .record import list_input_devices

    return _print_devices(list_input_devices(backend=backend), "input")


def _print_devices(devices: list[Any], kind: str) -> int:
    if not devices:
        what = "sound card" if kind == "output" else "microphone"
        print(f"no {kind} devices found: PortAudio sees no {what} (check ALSA/PulseAudio)")
        return 1
    for d in devices:
        mark = "*" if d.is_default else " "
        channels = d.max_output_channels if kind == "output" else d.max_input_channels
        print(f"{mark}{d.index:3d}  {d.name}  ({channels} ch{' in' if kind == 'input' else ''}, "
              f"{d.default_samplerate:g} Hz)")  # fmt: skip
    return 0


def _quality_line(report: Any) -> str:
    q = report.quality
    if q is None:
        return "  quality: not measured"

    def f(v: float | None, unit: str, scale: float = 1.0, digits: int = 0) -> str:
        return "n/a" if v is None else f"{v * scale:.{digits}f} {unit}"

    return (f"  quality: SNR {f(q.snr_db, 'dB')}, speech {f(q.speech_level_dbfs, 'dBFS')}, "
            f"noise {f(q.noise_floor_dbfs, 'dBFS')}, clipped {100 * q.clipped_share:.2f} %, "
            f"DC {100 * q.dc_offset:+.1f} %, decay {f(q.decay_s, 's', 1, 2)}, "
            f"steady pitch {f(q.steady_pitch_share, '%', 100)}")  # fmt: skip


def _verdict(report: Any, strict: bool) -> int:
    if not report.ok:
        return 1
    if strict and report.warnings:
        print(f"STRICT: {len(report.warnings)} warning(s) count as errors (--strict)")
        return 1
    return 0


def _precheck(sample: str, strict: bool) -> None:
    """Print the quality warnings of a local sample; with ``strict``, refuse on any."""
    if sample[:8].lower().startswith(("http://", "https://")) or not strict:
        return
    from .samples import inspect_sample

    report = inspect_sample(sample)
    if report.ok and report.warnings:
        warnings = "; ".join(w.message for w in report.warnings)
        raise UsageError(f"--strict: the sample has quality warnings: {warnings}")


class _Screen:
    """Draws the meter: redrawn in place on a terminal, a plain line a second otherwise."""

    def __init__(self, out: Any, *, target: str, script: tuple[str, ...], limit: float | None):
        self.out, self.target, self.script, self.limit = out, target, script, limit
        self.tty = bool(out.isatty())
        self.drawn = 0
        self.next_line_s = 0.0

    def __call__(self, status: Any) -> None:
        from .meter import progress_line, render

        if not self.tty:
            if status.recorded_s >= self.next_line_s:
                self.next_line_s = status.recorded_s + 1.0
                print(progress_line(status), file=self.out, flush=True)
            return
        import shutil

        lines = render(status, script=self.script, target=self.target, limit_s=self.limit)
        width = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
        up = f"\x1b[{self.drawn}F" if self.drawn else ""  # back to the first line drawn
        self.out.write(up + "".join(f"{line[:width]}\x1b[K\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)


def _script(args: argparse.Namespace) -> tuple[str, ...]:
    from .meter import script_for

    if args.script is None:
        try:
            return script_for(args.language or "en")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        text = args.script.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --script {str(args.script)!r}: {exc.strerror}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


async def _record_live(args: argparse.Namespace, out: Path) -> Any:
    """Record ``out`` with the live screen; Enter on a terminal or a pipe stops it."""
    import asyncio
    import stat

    from .record import record_sample

    screen = _Screen(sys.stdout, target=str(out), script=_script(args), limit=args.seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    fd: int | None = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        n = sys.stdin.fileno()
        if os.isatty(n) or stat.S_ISFIFO(os.fstat(n).st_mode):
            fd = n

    def on_stdin() -> None:
        assert fd is not None
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if data:
            stop.set()
        else:  # end of input: nobody will press Enter
            loop.remove_reader(fd)

    if fd is not None:
        loop.add_reader(fd, on_stdin)
    if not screen.tty:
        print(f"recording to {out}: stay quiet for {args.lead_in:g} s, then read; "
              "Enter stops", flush=True)  # fmt: skip
    try:
        device: int | str | None = args.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        return await record_sample(
            out, device=device, seconds=args.seconds, sample_rate=args.rate,
            backend=args.audio_backend, lead_in_s=args.lead_in, stop=stop, on_status=screen,
        )  # fmt: skip
    finally:
        if fd is not None:
            loop.remove_reader(fd)


def _record_command(args: argparse.Namespace) -> int:
    """``record`` and ``enroll``: one clear line on Ctrl-C, and nothing half-written."""
    from . import run

    out = args.out if args.command == "record" else None
    if args.command == "enroll":
        out = args.sample or args.out or Path(f"{args.name}.wav")
    try:
        return int(run(_record(args) if args.command == "record" else _enroll(args)))
    except KeyboardInterrupt:
        what = f"nothing was written to {out}" if out is not None else "nothing was recorded"
        print(f"tts-stream: interrupted: {what}", file=sys.stderr)
        return 130


def _print_recording(rec: Any) -> None:
    print(f"wrote {rec.path}: {rec.duration_s:.1f} s at {rec.sample_rate} Hz from "
          f"{rec.device!r} ({rec.recorded_s - rec.duration_s:.1f} s of lead-in and silence "
          "trimmed)")  # fmt: skip
    if rec.stats.dropped or rec.stats.overflows:
        print(f"  warning: {rec.stats.dropped} frames dropped, {rec.stats.overflows} input "
              "overflows: the machine was too busy; record again")  # fmt: skip


async def _record(args: argparse.Namespace) -> int:
    rec = await _record_live(args, args.out)
    _print_recording(rec)
    return _check(rec.path, args.strict)


async def _enroll(args: argparse.Namespace) -> int:
    if args.sample is None:
        rec = await _record_live(args, args.out or Path(f"{args.name}.wav"))
        _print_recording(rec)
        path = rec.path
    else:
        path = args.sample
    if _check(path, args.strict):
        return 1
    async with _engine(args) as engine:
        voice = await engine.voices.create(
            str(path), preferred_name=args.name, target_model=args.model, text=args.text,
            language=args.language,
        )  # fmt: skip
    print(f"voice: {voice.name}")
    given = (("--base-url", args.base_url), ("--data-dir", args.data_dir))
    where = "".join(f" {flag} {value}" for flag, value in given if value)
    print(f'try it: tts-stream speak {voice.name} "Hello! This is my cloned voice." '
          f"--play{where}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
