"""The data directory and the key file are not trusted blindly (issue 9.8); a public bind
warns (issue 9.9).

"Another user" is uid 65534 (nobody), made with ``os.chown`` in a temporary directory (the
tests run as root, as CI does).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from tts_stream.errors import UsageError
from tts_stream.server import LocalServer, _read_or_create_key, public_bind_warning, run_serve

NOBODY = 65534


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)  # so serve reads the key file


def serve_refuses(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``tts-stream serve`` on ``data_dir`` exits 2 at once; returns its error line."""
    assert run_serve(port=0, backend="tone", data_dir=data_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("tts-stream: error: ") and err.count("\n") == 1
    return err


def test_a_key_file_of_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text("sk-planted-by-nobody\n")
    os.chown(key_file, NOBODY, NOBODY)
    err = serve_refuses(tmp_path, capsys)
    assert str(key_file) in err and "belongs to uid 65534" in err and "mktemp -d" in err
    assert "sk-planted" not in err


def test_a_writable_key_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text("sk-local-x\n")
    key_file.chmod(0o666)
    err = serve_refuses(tmp_path, capsys)
    assert "writable by group or others (mode 666)" in err and f"chmod go-w {key_file}" in err


def test_a_dangling_key_symlink_is_refused_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "elsewhere" / "stolen_key"
    target.parent.mkdir()
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "api_key").symlink_to(target)
    err = serve_refuses(tmp_path / "data", capsys)
    assert "symbolic link; refusing to follow it" in err
    assert not target.exists()


@pytest.mark.parametrize("case", ["other owner", "world-writable"])
def test_a_shared_data_directory_is_refused(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "tts"
    shared.mkdir()
    if case == "other owner":
        os.chown(shared, NOBODY, NOBODY)
    else:
        shared.chmod(0o777)
    with pytest.raises(UsageError, match="data directory .*tts") as info:
        asyncio.run(LocalServer(port=0, data_dir=shared).start())
    assert "mktemp -d" in str(info.value)
    assert not (shared / "voices.sqlite3").exists()
    assert "data directory" in serve_refuses(shared, capsys)


async def test_a_symlinked_database_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "voices.sqlite3").symlink_to(tmp_path / "victim.db")
    with pytest.raises(UsageError, match="symbolic link"):
        await LocalServer(port=0, data_dir=data).start()
    assert not (tmp_path / "victim.db").exists()


async def test_new_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    async with LocalServer(port=0, data_dir=data):
        pass
    key = _read_or_create_key(data / "api_key")
    assert key.startswith("sk-local-") and _read_or_create_key(data / "api_key") == key
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("api_key", "voices.sqlite3"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


def test_a_public_bind_warns() -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        warning = public_bind_warning(host)
        assert warning is not None and "plain HTTP" in warning and host in warning
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert public_bind_warning(host) is None
