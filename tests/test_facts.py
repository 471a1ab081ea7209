"""Facts written once (issue 10): each shared rule has one definition that every side uses.

Pure tier: plain calls, no event loop, no network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.common import summarize as bench_summarize
from tts_stream import enrollment, environment, messages
from tts_stream.config import API_KEY_ENV, Endpoint
from tts_stream.errors import UsageError
from tts_stream.metrics import summarize
from tts_stream.server import voices


def test_the_data_dir_comes_from_one_variable(tmp_path: Path) -> None:
    assert environment.default_data_dir({environment.DATA_ENV: str(tmp_path)}) == tmp_path
    assert environment.default_data_dir({}) == Path.home() / ".local" / "share" / "tts-stream"
    assert environment.default_data_dir({environment.DATA_ENV: ""}).name == "tts-stream"


def test_the_api_key_variable_is_the_one_the_client_reads() -> None:
    assert API_KEY_ENV == environment.API_KEY_ENV == "DASHSCOPE_API_KEY"
    ep = Endpoint.resolve(region="intl", env={environment.API_KEY_ENV: "sk-test"})
    assert ep.has_key


def test_local_keys_carry_the_prefix() -> None:
    a, b = environment.new_local_key(), environment.new_local_key()
    assert a.startswith(environment.LOCAL_KEY_PREFIX) and a != b
    assert len(a) == len(environment.LOCAL_KEY_PREFIX) + 32


@pytest.mark.parametrize(
    "name", ["guan_yu_01", "a", "x" * 16, "", "x" * 17, "with-dash", "空", "abc\n", None, 7]
)
def test_client_and_server_agree_on_preferred_names(name: object) -> None:
    ok = messages.is_preferred_name(name)
    assert voices.PREFERRED_NAME_RE is messages.PREFERRED_NAME_RE
    if ok:
        assert enrollment.validate_preferred_name(name) == name
    else:
        with pytest.raises(UsageError):
            enrollment.validate_preferred_name(name)
    assert ok == (name in ("guan_yu_01", "a", "x" * 16))


def test_one_page_shape() -> None:
    assert enrollment.Page is messages.VoicePage
    page = messages.parse_voice_page(
        {"output": {"voice_list": [{"voice": "a", "target_model": "m"}], "page_index": 2,
                    "page_size": 5, "total_count": 11}, "request_id": "r"}
    )  # fmt: skip
    mapped = page.map(lambda v: v.voice.upper())
    assert list(mapped) == ["A"] and len(mapped) == 1
    assert (mapped.page_index, mapped.page_size, mapped.total_count, mapped.request_id) == (
        2, 5, 11, "r",
    )  # fmt: skip


def test_bench_summaries_are_the_library_s() -> None:
    values = [3.0, None, 1.0, 2.0, 10.0]
    lib = summarize(values)
    got = bench_summarize(values)
    assert got == {"count": lib.count, "min": 1.0, "mean": lib.mean, "p50": lib.p50,
                   "p95": lib.p95, "p99": lib.p99, "max": lib.max}  # fmt: skip
    assert bench_summarize([])["count"] == 0 and bench_summarize([None])["min"] is None
