"""Where and how to talk to DashScope: hosts, API key, workspace, request headers.

Role: resolve the user's options (``region``, ``base_url``, ``api_key``, ``workspace``) once
into an immutable :class:`Endpoint` that every client (enrollment over HTTP, realtime over
WebSocket) asks for URLs and headers. Boundary: no I/O and no clock; the only thing read
from the outside is the ``DASHSCOPE_API_KEY`` environment variable, and that mapping is an
argument so tests pass their own. The API key is kept out of ``repr``/``str``; only
:meth:`Endpoint.headers` hands it out, for the wire.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import quote, urlsplit

from . import __version__
from .environment import API_KEY_ENV
from .errors import UsageError
from .messages import REALTIME_PATH

__all__ = ["API_KEY_ENV", "REGIONS", "Endpoint"]

# protocol.md §2.1: the VC models and qwen-voice-enrollment are documented for these two.
REGIONS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "intl": ("https://dashscope-intl.aliyuncs.com", "wss://dashscope-intl.aliyuncs.com"),
        "cn": ("https://dashscope.aliyuncs.com", "wss://dashscope.aliyuncs.com"),
    }
)

_WS_SCHEME = {"http": "ws", "https": "wss"}


@dataclass(frozen=True)
class Endpoint:
    """Resolved service location and credentials. Build it with :meth:`resolve`.

    ``http_base`` / ``ws_base`` have no trailing slash. ``api_key`` is never shown by
    ``repr()`` or ``str()``; ``None`` only for a local server (``base_url``) that was given
    no key, in which case no ``Authorization`` header is sent.
    """

    http_base: str
    ws_base: str
    api_key: str | None = field(default=None, repr=False)
    workspace: str | None = None
    data_inspection: bool = False
    region: str | None = None

    @classmethod
    def resolve(
        cls,
        *,
        api_key: str | None = None,
        region: str = "intl",
        base_url: str | None = None,
        workspace: str | None = None,
        data_inspection: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Endpoint:
        """Resolve options into an :class:`Endpoint`.

        ``base_url`` (``http://host:port`` or ``https://...``) wins over ``region``; the
        WebSocket base is the same host with ``ws``/``wss``. The key comes from ``api_key``,
        else from ``env`` (default ``os.environ``) ``DASHSCOPE_API_KEY``.

        Raises:
            UsageError: unknown region, a base_url that is not http(s), or no key and no
                base_url (the cloud always needs a key).
        """
        environ = os.environ if env is None else env
        key = api_key if api_key else (environ.get(API_KEY_ENV) or None)
        if workspace is not None and not workspace.strip():
            workspace = None
        if base_url is not None:
            http_base, ws_base = _bases_from_url(base_url)
            return cls(http_base, ws_base, key, workspace, data_inspection, None)
        if region not in REGIONS:
            raise UsageError(
                f"unknown region {region!r}; use one of {', '.join(REGIONS)} or pass base_url=..."
            )
        if key is None:
            raise UsageError(
                f"no API key: set {API_KEY_ENV} or pass base_url=... for a local server; "
                "`tts-stream serve` runs one"
            )
        http_base, ws_base = REGIONS[region]
        return cls(http_base, ws_base, key, workspace, data_inspection, region)

    def http_url(self, path: str) -> str:
        """Absolute HTTP URL of ``path`` (e.g. ``messages.ENROLLMENT_PATH``)."""
        return self.http_base + "/" + path.lstrip("/")

    def ws_url(self, model: str) -> str:
        """Realtime WebSocket URL for ``model`` (protocol.md §2.2: model is mandatory)."""
        return f"{self.ws_base}{REALTIME_PATH}?model={quote(model, safe='')}"

    def headers(self) -> dict[str, str]:
        """Request headers of protocol.md §3: the only place the API key is revealed."""
        h = {
            "user-agent": f"tts-stream/{__version__} python/{platform.python_version()}",
        }
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        if self.workspace:
            h["X-DashScope-WorkSpace"] = self.workspace
        if self.data_inspection:
            h["X-DashScope-DataInspection"] = "enable"
        return h

    @property
    def has_key(self) -> bool:
        """Whether an API key is configured (without revealing it)."""
        return bool(self.api_key)

    def __repr__(self) -> str:
        key = "'sk-***'" if self.api_key else "None"
        return (
            f"Endpoint(http_base={self.http_base!r}, ws_base={self.ws_base!r}, api_key={key}, "
            f"workspace={self.workspace!r}, data_inspection={self.data_inspection!r}, "
            f"region={self.region!r})"
        )

    __str__ = __repr__


def _bases_from_url(base_url: str) -> tuple[str, str]:
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _WS_SCHEME or not parts.netloc:
        raise UsageError(
            f"base_url must look like http://127.0.0.1:8000 or https://host, got {base_url!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        # Credentials in a URL would end up in logs and reprs; the key goes in headers only.
        raise UsageError("base_url must not carry credentials, a query or a fragment")
    path = parts.path.rstrip("/")
    return f"{scheme}://{parts.netloc}{path}", f"{_WS_SCHEME[scheme]}://{parts.netloc}{path}"
