"""bench/sip_load.py runs end to end on a tiny load (sipp places 3 calls)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.peer


def test_sip_load_script(tmp_path: Path) -> None:
    out = tmp_path / "sip_load.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sip_load", "--concurrent", "3", "--rate", "3",
         "--hold", "3", "--calls", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    env, run = (json.loads(line) for line in out.read_text().splitlines())
    assert env["kind"] == "env" and run["kind"] == "sip_load"
    assert run["sipp_failed"] == 0 and run["calls_answered"] == 3
    assert run["rtp_packets_sent"] > 0 and run["first_audio_ms"]["count"] == 3
    assert "| 3 (" in proc.stdout
