"""``bench.first_audio --turns`` end to end in a tiny configuration (so it never rots).

Runs the script as the README's command does, against its own local server process, and
checks that no turn dialled a session of its own (no prewarm between a lead turn and the
measured one: the pool refills by itself) and that the raw socket and SDK rows are there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_bench_smoke import check_env, read_lines, run_bench

pytestmark = pytest.mark.peer  # with --modes sdk it drives the official dashscope SDK


def test_turns_mode(tmp_path: Path) -> None:
    out = tmp_path / "turns.jsonl"
    proc = run_bench("bench.first_audio", "--turns", "50,1000", "--n", "2", "--warmup", "1",
                     "--modes", "sdk", "--out", str(out))  # fmt: skip
    records = read_lines(out)
    check_env(records[0])
    utterances = [r for r in records if r["kind"] == "utterance"]
    assert {r["mode"] for r in utterances} == {"turn", "raw", "sdk"}
    assert len(utterances) == 3 * 2 * (2 + 1)  # three modes, two gaps, 1 + 2 rounds
    for r in utterances:
        assert r["error"] is None and 0 < r["from_start_ms"] < 10_000
    pool = next(r for r in records if r["kind"] == "pool")["stats"]
    # No turn dialled a session of its own: one refill per turn plus the first prewarm, and
    # a turn that came before its refill was ready waited for that dial (on a loaded
    # machine a 50 ms gap can be shorter than a dial; the benchmark reports how often).
    assert pool["dials"] == pool["warm_acquires"] + pool["cold_acquires"] + 1
    assert set(pool["cold_reasons"]) <= {"refill_in_flight"}
    assert pool["warm_acquires"] > 0
    summary = records[-1]
    assert summary["kind"] == "summary"
    turns = [r for r in utterances if r["mode"] == "turn" and not r["warmup"]]
    assert summary["gap_50"]["turn"]["warm"] == sum(
        1 for r in turns if r["gap_ms"] == 50 and r["was_warm"]
    )
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| 50 |" in table and "| 1000 |" in table and table in proc.stdout
