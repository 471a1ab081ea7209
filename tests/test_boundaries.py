"""The dependency rules of the architecture (README "Architecture"), checked on the source.

The engine never imports ``sinks`` or ``integrations`` (the framework adapters, which use
the engine and the sinks like an application); ``sinks`` import only ``tts_stream.audio``,
``tts_stream.channel`` (the one queue type), ``tts_stream.errors`` and
``tts_stream.portaudio`` (the ring and devices shared with the recorder); the server never
imports the client; the pure core imports no asyncio, sockets or clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ("messages", "protocol", "audio", "ledger", "resume", "meter", "telephony/sip",
        "telephony/sdp", "telephony/ua", "telephony/dtmf", "server/session")  # fmt: skip
CLIENT = ("protocol", "connection", "pool", "speech", "fanout", "engine", "enrollment", "config",
          "metrics", "channel")  # fmt: skip


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def modules(folder: str) -> list[Path]:
    """Python files under ``folder``, leaving out hidden directories (bench's own venvs)."""
    paths = (ROOT / folder).rglob("*.py")
    return sorted(p for p in paths
                  if not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def engine_modules() -> list[Path]:
    """``tts_stream`` without the framework adapters (``tts_stream/integrations``)."""
    return [p for p in modules("tts_stream") if "integrations" not in p.parts]


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_the_engine_never_imports_sinks(path: Path) -> None:
    if path.name in ("cli.py", "_demo.py"):  # the composition roots may
        return
    if "telephony" in path.parts:  # an application of the engine and the sinks (DESIGN.md)
        return
    if "testing" in path.parts:  # test support that drives the engine and the sinks
        return
    assert not {m for m in imports(path) if m == "sinks" or m.startswith("sinks.")}


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_the_engine_never_imports_the_integrations(path: Path) -> None:
    assert not {m for m in imports(path) if m.startswith("tts_stream.integrations")}


@pytest.mark.parametrize("path", modules("sinks"), ids=lambda p: p.name)
def test_sinks_import_only_audio_channel_errors_and_portaudio(path: Path) -> None:
    allowed = {"tts_stream.audio", "tts_stream.channel", "tts_stream.errors",
               "tts_stream.portaudio"}  # fmt: skip
    ours = {m for m in imports(path) if m.startswith("tts_stream")}
    assert all(m in allowed or m.rsplit(".", 1)[0] in allowed for m in ours), ours


@pytest.mark.parametrize("path", modules("tts_stream"), ids=lambda p: p.name)
def test_the_engine_never_imports_telephony(path: Path) -> None:
    if path.name in ("cli.py",) or "telephony" in path.parts:
        return
    assert not {m for m in imports(path) if m.startswith("tts_stream.telephony")}


def test_telephony_uses_only_the_public_api() -> None:
    """Telephony imports the engine's package API and the sinks, like an application."""
    allowed = {"tts_stream", "tts_stream.audio", "tts_stream.errors"}
    for path in modules("tts_stream/telephony"):
        ours = {m for m in imports(path) if m.startswith("tts_stream")
                and not m.startswith("tts_stream.telephony")}  # fmt: skip
        assert all(m in allowed or m.rsplit(".", 1)[0] in allowed for m in ours), (path, ours)


@pytest.mark.parametrize("name", ["rtp_packet", "g711"])
def test_the_rtp_packet_layer_is_pure(name: str) -> None:
    found = imports(ROOT / "sinks" / f"{name}.py")
    assert not found & {"asyncio", "socket", "time", "threading"}


def test_relative_imports_are_resolved() -> None:
    """The checks above see ``from ..messages import X`` as ``tts_stream.messages``."""
    found = imports(ROOT / "tts_stream" / "server" / "app.py")
    assert {"tts_stream.messages", "tts_stream.samples"} <= found


@pytest.mark.parametrize("path", modules("tts_stream/server"), ids=lambda p: p.name)
def test_the_server_never_imports_the_client(path: Path) -> None:
    client = {f"tts_stream.{m}" for m in CLIENT}
    hit = {m for m in imports(path) if m in client or m.rsplit(".", 1)[0] in client}
    assert not hit, hit


@pytest.mark.parametrize("path", [*modules("bench"), *modules("tts_stream"), *modules("sinks")],
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_nothing_outside_tests_imports_tests(path: Path) -> None:
    hit = {m for m in imports(path) if m == "tests" or m.startswith("tests.")}
    assert not hit, hit  # shared support lives in tts_stream.testing


@pytest.mark.parametrize("name", PURE)
def test_the_core_is_pure(name: str) -> None:
    found = imports(ROOT / "tts_stream" / f"{name}.py")
    banned = {"asyncio", "socket", "time", "anyio", "websockets", "aiohttp", "threading"}
    assert not found & banned, found & banned


# --- function length ------------------------------------------------------------------------
# No function in ``tts_stream`` or ``sinks`` is longer than MAX_FUNCTION_LINES (ruff's C901
# and PLR rules in pyproject.toml keep their complexity down).

MAX_FUNCTION_LINES = 60


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of every function or method longer than ``limit`` lines,
    counted from its ``def`` to its last line (decorators aside; nested functions count
    inside their parent and on their own)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append((node.name, node.lineno, lines))
    return out


def test_the_length_check_counts_lines_from_def_to_end() -> None:
    def source(lines: int) -> str:
        body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
        return f"@decorator\nasync def f() -> None:\n    \"\"\"Doc.\"\"\"\n{body}"

    assert long_functions(source(MAX_FUNCTION_LINES)) == []
    assert long_functions(source(MAX_FUNCTION_LINES + 1)) == [("f", 2, MAX_FUNCTION_LINES + 1)]
    method = "class C:\n    def m(self) -> None:\n" + "        pass\n" * MAX_FUNCTION_LINES
    assert long_functions(method) == [("m", 2, MAX_FUNCTION_LINES + 1)]


@pytest.mark.parametrize(
    "path", [*modules("tts_stream"), *modules("sinks")], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_function_is_longer_than_the_limit(path: Path) -> None:
    assert long_functions(path.read_text(encoding="utf-8")) == []
