"""The benchmark scripts run end to end in a tiny configuration (so they never rot).

Each script runs as a subprocess exactly as the README's command does (``python -m
bench.<name>``), against its own local server process, with a few utterances and N=2; the
test checks the JSON lines (environment first, well-formed records, a summary), the
markdown table and the PNG. Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 150.0

pytestmark = pytest.mark.peer  # the first-audio script drives the official dashscope SDK


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines, f"{path} is empty"
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and "kind" in r for r in records)
    return records


def check_env(env: dict[str, Any]) -> None:
    assert env["kind"] == "env"
    for key in ("python", "cpu_model", "cpu_count", "loop", "git_commit", "versions"):
        assert key in env
    for dist in ("numpy", "websockets"):
        assert env["versions"][dist]


def test_first_audio_script(tmp_path: Path) -> None:
    out = tmp_path / "first_audio.jsonl"
    proc = run_bench("bench.first_audio", "--n", "3", "--warmup", "1", "--out", str(out))
    records = read_lines(out)
    check_env(records[0])
    utterances = [r for r in records if r["kind"] == "utterance"]
    assert {r["mode"] for r in utterances} == {"warm", "cold", "sdk"}
    assert len(utterances) == 3 * (3 + 1)
    for r in utterances:
        assert r["error"] is None
        assert 0 < r["from_text_ms"] <= r["from_start_ms"] < 10_000
    for r in utterances:
        if r["mode"] != "sdk":
            assert r["engine_added_ms"] > 0 and r["lag_exact"] is True
    summary = records[-1]
    assert summary["kind"] == "summary"
    for mode in ("warm", "cold", "sdk"):
        s = summary[mode]["from_text_ms"]
        assert s["count"] == 3 and s["p50"] <= s["p99"] <= s["max"]
    assert summary["ratios_p50"]["sdk_over_warm_from_start_ms_p50"] > 0
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| warm | first text |" in table and table in proc.stdout
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_concurrency_script(tmp_path: Path) -> None:
    out = tmp_path / "concurrency.jsonl"
    run_bench(
        "bench.concurrency", "--levels", "1,2", "--loops", "asyncio,uvloop",
        "--seconds", "1", "--ramp-s", "0.1", "--out", str(out),
    )  # fmt: skip
    records = read_lines(out)
    check_env(records[0])
    points = [r for r in records if r["kind"] == "point"]
    assert [(p["n"], p["loop"]) for p in points] == [
        (1, "asyncio"), (1, "uvloop"), (2, "asyncio"), (2, "uvloop"),
    ]  # fmt: skip
    for p in points:
        assert p["errors"] == 0, p.get("error_examples")
        assert p["first_audio_ms"]["count"] == p["n"]
        assert p["frames"] > 0 and 0 <= p["late_frames"] <= p["frames"]
        assert p["audio_s"] == pytest.approx(p["n"] * 1.0, rel=0.5)
        assert p["client_cpu_s"] > 0 and p["peak_rss_kb"] > 0
        assert p["server_cpu_s"] >= 0
    utterances = read_lines(out.with_name("concurrency_utterances.jsonl"))
    assert len(utterances) == 1 + 1 + 2 + 2
    assert all(u["first_audio_ms"] > 0 for u in utterances)
    assert "| asyncio | 2 |" in out.with_suffix(".md").read_text(encoding="utf-8")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_summary_of_a_py_spy_raw_file(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    loop = "main (x.py:1);BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    raw.write_text(
        f"{loop};Handle._run (asyncio/events.py:80);Connection._reader (c.py:3) 30\n"
        f"{loop};Handle._run (asyncio/events.py:80);Speech._pump (s.py:9);f (s.py:2) 10\n"
        f"{loop};EpollSelector.select (selectors.py:468) 500\n"
    )
    proc = run_bench("bench.common", "profile", str(raw))
    assert "busy samples in the event loop: 40" in proc.stdout
    assert "75.0%  Connection._reader (c.py)" in proc.stdout
    assert "select" not in proc.stdout


def test_lateness_is_measured_against_the_first_frame() -> None:
    from bench.concurrency import lateness_ms, utterance_text

    # three 100 ms frames at 24 kHz: on time, 30 ms late, 20 ms early
    writes = [(10.0, 0, 2400), (10.13, 2400, 2400), (10.18, 4800, 2400)]
    assert lateness_ms(writes, 24000) == pytest.approx([0.0, 30.0, -20.0])
    text = utterance_text(5.0)
    assert text.endswith(".") and len(text) == int(5.0 * 1000 / 60)


def test_exporters_script(tmp_path: Path) -> None:
    out = tmp_path / "exporters.jsonl"
    proc = run_bench("bench.exporters", "--n", "2", "--repeats", "1", "--seconds", "1",
                     "--out", str(out))  # fmt: skip
    records = read_lines(out)
    check_env(records[0])
    points = {r["exporters"]: r for r in records if r["kind"] == "point"}
    assert set(points) == {"none", "prometheus", "otel", "both", "all"}
    assert "exporter_cpu_s" not in points["none"]
    for mode in ("prometheus", "otel", "both", "all"):
        assert 0 < points[mode]["exporter_cpu_s"] < points[mode]["client_cpu_s"]
        assert points[mode]["exporter_calls"] == 2
    assert points["prometheus"]["scrape_ms"] > 0 and points["otel"]["scrape_ms"] is None
    table = out.with_suffix(".md").read_text()
    assert "median share" in table and table in proc.stdout
