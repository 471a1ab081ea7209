"""The public API: package exports match ``__all__``, modules declare ``__all__``, and the
signatures DESIGN.md promises exist (keyword-only options)."""

from __future__ import annotations

import importlib
import inspect

import pytest

import tts_stream

MODULES = ["protocol", "connection", "pool", "speech", "fanout", "metrics", "engine"]

EXPECTED = {
    "AcquireInfo", "AudioFormat", "AuthenticationError", "ClosedError", "ConnectionFailed",
    "ConnectionLost", "DeviceError", "Engine", "Frame", "HandshakeRejected", "InterruptReport",
    "MissingDependency", "ModelMismatch", "Policy", "PoolStats", "ProtocolViolation",
    "QuotaExceeded", "RateLimited", "SampleRejected", "ServerError", "Sink", "SinkStats",
    "Speech", "SpeechOptions", "Summary", "Timeout", "TtsStreamError", "UsageError",
    "UtteranceMetrics", "Voice", "VoiceNotFound", "__version__", "run", "summarize_records",
}  # fmt: skip


def test_package_exports_match_all() -> None:
    assert set(tts_stream.__all__) == EXPECTED
    assert len(tts_stream.__all__) == len(set(tts_stream.__all__))
    for name in tts_stream.__all__:
        assert hasattr(tts_stream, name), name
    public = {n for n in vars(tts_stream) if not n.startswith("_")}
    submodules = {n for n in public if inspect.ismodule(getattr(tts_stream, n))}
    assert public - submodules - {"annotations"} == EXPECTED - {"__version__"}


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_all(name: str) -> None:
    mod = importlib.import_module(f"tts_stream.{name}")
    assert mod.__doc__ and len(mod.__doc__.strip().splitlines()) >= 3
    for item in mod.__all__:
        assert hasattr(mod, item), f"{name}.{item}"


def test_engine_signatures_are_keyword_only() -> None:
    init = inspect.signature(tts_stream.Engine.__init__)
    for p in list(init.parameters.values())[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
    for param in ("api_key", "region", "base_url", "workspace", "pool_size", "max_idle_s"):
        assert param in init.parameters
    speak = inspect.signature(tts_stream.Engine.speak)
    assert list(speak.parameters)[:2] == ["self", "voice"]
    for name in ("sinks", "model", "mode", "sample_rate", "first_commit"):
        assert speak.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert speak.parameters["mode"].default == "server_commit"
    assert speak.parameters["sample_rate"].default is None  # the sinks' preferred rate, else 24 kHz
    say = inspect.signature(tts_stream.Engine.say)
    assert list(say.parameters)[:3] == ["self", "voice", "text"]
    assert "n" in inspect.signature(tts_stream.Engine.prewarm).parameters
    for name in ("push", "commit", "interrupt"):
        assert inspect.iscoroutinefunction(getattr(tts_stream.Speech, name))


def test_run_helper_runs_a_coroutine() -> None:
    async def answer() -> int:
        return 42

    assert tts_stream.run(answer) == 42
    assert tts_stream.run(answer()) == 42


def test_library_does_not_import_sinks() -> None:
    for name in MODULES:
        src = inspect.getsource(importlib.import_module(f"tts_stream.{name}"))
        assert "import sinks" not in src and "from sinks" not in src
