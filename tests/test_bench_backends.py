"""bench/formats.py and bench/backends.py run end to end in a tiny configuration.

(bench/likeness.py shares its measurement with tests/test_likeness.py, which runs it.)
Each script runs as a subprocess exactly as bench/README.md says, bounded by a timeout.
"""

from __future__ import annotations

from pathlib import Path

from bench.backends import wer

from .test_bench_smoke import check_env, read_lines, run_bench


def test_formats_script(tmp_path: Path) -> None:
    out = tmp_path / "formats"
    proc = run_bench("bench.formats", "--backend", "tone", "--repeat", "1", "--out", str(out))
    records = read_lines(out.with_suffix(".jsonl"))
    check_env(records[0])
    rows = {(r["format"], r["bit_rate_kbps"]): r for r in records[1:]}
    assert set(rows) >= {("pcm", None), ("wav", None), ("mp3", None), ("opus", 32)}
    pcm, opus = rows[("pcm", None)], rows[("opus", 32)]
    assert pcm["payload_kbit_per_s"] == 384.0 and pcm["wire_ratio"] == 1.0
    assert opus["wire_kB_per_s"] < pcm["wire_kB_per_s"] / 4
    assert all(r["decode_ms_per_s"] > 0 for r in rows.values())
    assert "| opus | 32 |" in proc.stdout


def test_backends_script(tmp_path: Path) -> None:
    out = tmp_path / "backends"
    run_bench("bench.backends", "--backends", "tone", "--n", "2", "--repeat", "1",
              "--out", str(out))  # fmt: skip
    records = read_lines(out.with_suffix(".jsonl"))
    check_env(records[0])
    speaker = next(r for r in records[1:] if r["voice"] == "speaker")
    assert speaker["first_audio_ms"]["count"] == 2 and speaker["rtf"] < 0.1
    assert "| tone | speaker |" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_word_error_rate() -> None:
    assert wer("The cat sat.", "the cat sat") == 0.0
    assert wer("a b c", "a x c") == 1 / 3
    assert wer("a b c", "") == 1.0
    assert wer("a b", "a b c d") == 1.0
