"""What tts-stream takes from the process environment, written once.

Role: the names and defaults that the client (:mod:`tts_stream.config`), the local server
(:mod:`tts_stream.server`) and the CLI share: the API-key variable (``DASHSCOPE_API_KEY``,
the DashScope SDK's own), the data-directory variable and its default, and the prefix of the
keys a local server makes. Boundary: no I/O but reading the environment mapping it is given
(``os.environ`` by default) and ``Path.home()``; it imports nothing of tts-stream, so the
server may use it without importing the client.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

__all__ = ["API_KEY_ENV", "DATA_ENV", "LOCAL_KEY_PREFIX", "default_data_dir", "new_local_key"]

#: The variable holding the DashScope API key (read by the client, the server and the CLI).
API_KEY_ENV = "DASHSCOPE_API_KEY"
#: The variable naming the data directory of the local server (voices, its generated key).
DATA_ENV = "TTS_STREAM_DATA"
#: Keys made by a local server start with this (DashScope keys start with ``sk-``).
LOCAL_KEY_PREFIX = "sk-local-"


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$TTS_STREAM_DATA`` or ``~/.local/share/tts-stream`` (the ``serve`` default)."""
    value = (os.environ if env is None else env).get(DATA_ENV)
    return Path(value) if value else Path.home() / ".local" / "share" / "tts-stream"


def new_local_key() -> str:
    """A fresh random key for a local server: :data:`LOCAL_KEY_PREFIX` + 32 hex digits."""
    return LOCAL_KEY_PREFIX + secrets.token_hex(16)
