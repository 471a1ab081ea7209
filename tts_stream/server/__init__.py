"""Local DashScope-compatible server: voice enrollment (HTTP) and Qwen-TTS Realtime (WebSocket).

Role: everything in tts-stream can run, be tested and be benchmarked without a cloud account.
One aiohttp server on one port (127.0.0.1 by default) speaks protocol.md §4 and §5 with real
offline synthesis (``backend="espeak"``) or a nearly free deterministic tone
(``backend="tone"``)::

    async with LocalServer(port=0, backend="tone") as srv:
        srv.base_url      # "http://127.0.0.1:PORT"; WebSocket: srv.ws_url
        srv.api_key       # accepted key (generated "sk-local-..." unless given)
        srv.faults        # fault knobs for the next sessions (see faults.py)
        srv.stats()       # counters snapshot (ServerStats)

Boundary: the server reuses ``messages`` and ``samples``, never the client side of tts-stream.
Files: ``app.py`` (HTTP + routing), ``realtime.py`` (sessions), ``pacer.py`` (the one
real-time pacing timer per loop), ``voices.py`` (SQLite store), ``synth.py`` (speech
backends), ``faults.py`` (fault knobs, counters).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..environment import API_KEY_ENV, default_data_dir, new_local_key
from ..errors import ClosedError, UsageError
from ..messages import REALTIME_PATH
from .app import EnrollmentConfig, ServerApp, is_loopback_host
from .faults import Counters, Faults, ServerStats
from .listener import ClientFaultFilter, Listener, connection_cap
from .realtime import RealtimeConfig
from .synth import Synthesizer, make_synthesizer
from .voices import VoiceStore

__all__ = ["Faults", "LocalServer"]

log = logging.getLogger(__name__)

# aiohttp logs every malformed request and every mid-request disconnect at ERROR with a
# traceback: through this logger they are one rate-limited WARNING line instead.
_http_log = logging.getLogger(__name__ + ".http")
_http_log.addFilter(ClientFaultFilter((HttpProcessingError, ConnectionError, RequestPayloadError)))

_DB_NAME = "voices.sqlite3"
_DAY = 86400.0


def public_bind_warning(host: str) -> str | None:
    """The warning for serving on ``host`` when it is not a loopback address, else None."""
    if is_loopback_host(host):
        return None
    return (f"serving on {host}: reachable from other machines, in plain HTTP (no TLS), so "
            "the API key crosses the network readable by anyone on the path; bind 127.0.0.1 "
            "(the default) unless that is what you want. Sample URLs are fetched only for "
            "clients on this machine.")  # fmt: skip


_PRIVATE_HINT = 'use a private directory of your own instead, e.g. --data-dir "$(mktemp -d)"'


def _check_owned(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse ``path`` unless this user owns it and neither group nor others can write it."""
    me = os.geteuid()
    if st.st_uid != me:
        raise UsageError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {me}): "
                         "another user could plant or read its contents; "
                         f"{_PRIVATE_HINT}")  # fmt: skip
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        raise UsageError(f"{what} {path} is writable by group or others (mode {mode:o}): run "
                         f"'chmod go-w {path}', or {_PRIVATE_HINT}")  # fmt: skip


def private_data_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check that it is this user's and not group/world-writable.

    Raises :class:`~tts_stream.errors.UsageError` naming the path and the fix otherwise.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"data directory {path} is not a directory")
    _check_owned(path, st, "data directory")
    return path


def open_private_file(path: Path, flags: int) -> int | None:
    """A descriptor of the existing regular file ``path``, never through a symlink, after
    checking its owner and mode; ``None`` when it does not exist (create it with
    :func:`create_private_file`)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink, dangling or not: never followed
            raise UsageError(f"{path} is a symbolic link; refusing to follow it: remove it "
                             "(the server creates the file itself)") from exc  # fmt: skip
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file: remove it")
        _check_owned(path, st, "file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private_file(path: Path) -> int:
    """Create ``path`` for writing with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:  # appeared meanwhile (or a dangling symlink)
        raise UsageError(f"{path} appeared while the server was creating it: remove it if "
                         "you did not make it, then start again") from exc  # fmt: skip


def _prepare_store(data_dir: Path) -> Path:
    """Check the data directory and the database file (created 0600 when absent)."""
    private_data_dir(data_dir)
    db = data_dir / _DB_NAME
    fd = open_private_file(db, os.O_RDONLY)
    os.close(fd if fd is not None else create_private_file(db))
    return db


def _check_options(
    rt: RealtimeConfig, enrollment: EnrollmentConfig, max_connections: int, header_timeout_s: float
) -> None:
    """The :class:`LocalServer` options that are out of range, as a :class:`UsageError`."""
    if rt.pacing not in ("burst", "realtime"):
        raise UsageError(f"pacing must be 'burst' or 'realtime', not {rt.pacing!r}")
    if rt.cancel not in ("error", "truncate"):
        raise UsageError(f"cancel must be 'error' or 'truncate', not {rt.cancel!r}")
    if rt.delta_ms <= 0:
        raise UsageError("delta_ms must be positive")
    if min(max_connections, enrollment.max_inspections, enrollment.max_uploads) < 1:
        raise UsageError("max_connections, max_inspections and max_uploads must be >= 1")
    if min(header_timeout_s, enrollment.body_timeout_s) <= 0:
        raise UsageError("header_timeout_s and body_timeout_s must be positive")


class LocalServer:
    """The local server as an async context manager (see the module docstring).

    Every option is keyword-only. ``data_dir=None`` keeps voices in a temporary directory
    removed at close; give a directory to keep them across restarts. ``clock`` is the wall
    clock (epoch seconds) used for voice names, timestamps and the retention purge; tests
    inject their own. Realtime options (``pacing``, ``delta_ms``, ``cut_*``, ``cancel``,
    ``session_timeout_s``) are described in ``realtime.py``.

    Limits against slow, broken or hostile clients: ``max_connections`` open at once (lowered
    to fit the open-files limit; more wait in the listen backlog), ``header_timeout_s`` for a
    request's headers to arrive (also the idle keep-alive time), ``body_timeout_s`` for its
    body, ``max_inspections`` clone samples decoded and analysed at once, ``max_uploads``
    large bodies (over 1 MiB) read and inspected at once.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: str = "tone",
        data_dir: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        pacing: Literal["burst", "realtime"] = "burst",
        delta_ms: float = 100.0,
        quota: int = 1000,
        retention_days: float = 365.0,
        clock: Callable[[], float] = time.time,
        cut_punctuation: str = "。！？!?；;.\n",
        cut_max_chars: int = 120,
        cut_idle_s: float | None = 1.0,
        cancel: Literal["error", "truncate"] = "error",
        session_timeout_s: float = 600.0,
        synthesizer: Synthesizer | None = None,
        backlog: int = 2048,
        max_connections: int = 4096,
        header_timeout_s: float = 20.0,
        body_timeout_s: float = 30.0,
        max_inspections: int = 2,
        max_uploads: int = 4,
    ) -> None:
        self._realtime = RealtimeConfig(
            pacing=pacing, delta_ms=delta_ms, cut_punctuation=cut_punctuation,
            cut_max_chars=cut_max_chars, cut_idle_s=cut_idle_s, cancel=cancel,
            session_timeout_s=session_timeout_s,
        )  # fmt: skip
        self._enrollment = EnrollmentConfig(
            quota=quota, retention_s=retention_days * _DAY, body_timeout_s=body_timeout_s,
            max_inspections=max_inspections, max_uploads=max_uploads,
        )  # fmt: skip
        _check_options(self._realtime, self._enrollment, max_connections, header_timeout_s)
        self.host = host
        self._port = port
        self._backend = backend
        self._synthesizer = synthesizer
        self._data_dir_opt = Path(data_dir) if data_dir is not None else None
        self.api_key = api_key or new_local_key()
        self._clock = clock
        self._backlog = backlog
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s
        self._listener: Listener | None = None
        self.faults = Faults()
        self._counters = Counters()
        self._extra_keys: list[str] = []
        self._runner: web.AppRunner | None = None
        self._store: VoiceStore | None = None
        self._app: ServerApp | None = None
        self._tmpdir: Path | None = None
        self._bound_port: int | None = None
        self._closed = False
        self.data_dir: Path | None = None  # set by start(): the voices database lives here

    def __repr__(self) -> str:  # never shows the API key
        where = self.base_url if self._bound_port is not None else "not started"
        return f"<LocalServer {where} backend={self._backend}>"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> LocalServer:
        """Open the store and listen; returns self."""
        if self._closed:
            raise ClosedError("LocalServer is closed")
        if self._runner is not None:
            return self
        try:
            data_dir = self._data_dir_opt
            if data_dir is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix="tts-stream-server-"))
                data_dir = self._tmpdir
            db = _prepare_store(data_dir)
            self.data_dir = data_dir
            self._store = VoiceStore(
                db,
                quota=self._enrollment.quota,
                retention_s=self._enrollment.retention_s,
            )
            self._store.purge(now=self._clock())
            synth = self._synthesizer or make_synthesizer(self._backend)
            await synth.warm_up()  # so the first session's first audio is not a calibration
            self._app = ServerApp(
                store=self._store,
                synthesizer=synth,
                faults=self.faults,
                counters=self._counters,
                clock=self._clock,
                realtime=self._realtime,
                enrollment=self._enrollment,
            )
            for key in (self.api_key, *self._extra_keys):
                self._app.add_key(key)
            # aiohttp's keep-alive timer runs from the connection's start (and from each
            # answer) until a complete request head: that is the header timeout. After an
            # early answer, an unread body is drained for 2 s at most, then the socket closed.
            self._runner = web.AppRunner(
                self._app.build(), access_log=None, shutdown_timeout=2.0, handle_signals=False,
                keepalive_timeout=self._header_timeout_s, lingering_time=2.0, logger=_http_log,
            )  # fmt: skip
            await self._runner.setup()
            assert self._runner.server is not None
            self._listener = Listener(
                self._runner.server, max_connections=connection_cap(self._max_connections),
                backlog=self._backlog,
            )  # fmt: skip
            await self._listener.start(self.host, self._port)
            self._bound_port = self._listener.port
        except BaseException:
            await self.aclose()
            raise
        warning = public_bind_warning(self.host)
        if warning is not None:
            log.warning("%s", warning)
        log.info("local server listening on %s (backend %s)", self.base_url, self._backend)
        return self

    async def aclose(self) -> None:
        """Stop listening, close every session (1001) and the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._store is not None:
            self._store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def __aenter__(self) -> LocalServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- accessors ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise UsageError("LocalServer is not started")
        return self._bound_port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The realtime endpoint without query: ``ws://HOST:PORT/api-ws/v1/realtime``."""
        return "ws" + self.base_url[4:] + REALTIME_PATH

    def add_api_key(self, api_key: str) -> None:
        """Accept another API key (a separate tenant: it sees only its own voices)."""
        self._extra_keys.append(api_key)
        if self._app is not None:
            self._app.add_key(api_key)

    @property
    def max_connections(self) -> int:
        """Connections served at once (``max_connections`` within the open-files limit)."""
        if self._listener is None:
            raise UsageError("LocalServer is not started")
        return self._listener.max_connections

    def stats(self) -> ServerStats:
        """A snapshot of the counters (connections, sessions, deltas, ...)."""
        return self._counters.snapshot()

    def synthesis_queue(self) -> tuple[int, int]:
        """(segments waiting to be synthesized, responses synthesizing now), all sessions."""
        if self._app is None:
            return 0, 0
        sessions = list(self._app.realtime.sessions)
        return sum(s.queue.qsize() for s in sessions), sum(1 for s in sessions if s.responding)

    def purge_expired(self) -> int:
        """Run the retention purge now (it also runs on every enrollment call)."""
        if self._store is None:
            raise UsageError("LocalServer is not started")
        return self._store.purge(now=self._clock())


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "espeak",
    data_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    ready: Callable[[LocalServer], None] | None = None,
    metrics_port: int | None = None,
    **options: Any,
) -> None:
    """Run a :class:`LocalServer` until cancelled; ``ready(srv)`` is called once listening.

    ``metrics_port`` also serves the server's Prometheus metrics on ``host:metrics_port``.
    """
    async with LocalServer(
        host=host, port=port, backend=backend, data_dir=data_dir, api_key=api_key, **options
    ) as srv:
        endpoint = None
        if metrics_port is not None:
            from .metrics import serve_metrics

            endpoint = serve_metrics(srv, port=metrics_port, host=host)
        try:
            if ready is not None:
                ready(srv)
            if endpoint is not None:
                print(f"metrics at {endpoint.url}", flush=True)  # noqa: T201 - CLI boundary
            await asyncio.Event().wait()  # runs until cancelled (SIGINT/SIGTERM in run_serve)
        finally:
            if endpoint is not None:
                endpoint.close()


def run_serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "espeak",
    data_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    *,
    pacing: Literal["burst", "realtime"] = "burst",
    metrics_port: int | None = None,
) -> int:
    """``tts-stream serve``: run until SIGINT/SIGTERM; print the base URL; exit code.

    The API key is ``api_key``, else ``$DASHSCOPE_API_KEY``, else a generated key stored in
    ``<data_dir>/api_key`` (mode 0600) whose *path* is printed: keys are never printed.
    """
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    key_file: Path | None = None
    key = api_key or os.environ.get(API_KEY_ENV)
    try:
        if not key:
            key_file = directory / "api_key"
            key = _read_or_create_key(key_file)
    except UsageError as exc:
        print(f"tts-stream: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI boundary
        return 2

    def ready(srv: LocalServer) -> None:
        print(srv.base_url, flush=True)  # noqa: T201 - the CLI boundary
        if key_file is not None:
            print(f"api key in {key_file}", flush=True)  # noqa: T201
        print(f"speaking with the {backend} backend", flush=True)  # noqa: T201

    try:
        asyncio.run(_until_signalled(host=host, port=port, backend=backend, data_dir=directory,
                                     api_key=key, ready=ready, pacing=pacing,
                                     metrics_port=metrics_port))  # fmt: skip
    except asyncio.CancelledError:
        pass
    except UsageError as exc:  # e.g. a data directory that is not private
        print(f"tts-stream: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI boundary
        return 2
    except OSError as exc:
        hint = " (another server has it: pick another --port, or --port 0 for any free one)"
        busy = exc.errno == errno.EADDRINUSE or "address already in use" in str(exc)
        msg = f"cannot serve on {host}:{port}: {exc.strerror or exc}" + (hint if busy else "")
        print(f"tts-stream: error: {msg}", file=sys.stderr)  # noqa: T201 - the CLI boundary
        return 1
    return 0


async def _until_signalled(**options: Any) -> None:
    """:func:`serve` until SIGINT or SIGTERM cancels it."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await serve(**options)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _read_or_create_key(key_file: Path) -> str:
    """The key stored in ``key_file`` (checked: this user's, not writable by others, no
    symlink), or a new one written there with mode 0600."""
    private_data_dir(key_file.parent)
    fd = open_private_file(key_file, os.O_RDONLY)
    if fd is not None:
        with os.fdopen(fd) as f:
            key = f.read().strip()
        if key:
            return key
        os.unlink(key_file)  # empty (an interrupted first start): make a new one
    key = new_local_key()
    with os.fdopen(create_private_file(key_file), "w") as f:
        f.write(key + "\n")
    return key
