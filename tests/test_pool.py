"""The warm-spare pool against the real LocalServer: warm/cold acquires, refill, idle age,
stale spares, parallel dials, graceful shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import Enroll
from tts_stream import protocol as p
from tts_stream.config import Endpoint
from tts_stream.errors import ClosedError, HandshakeRejected, ServerError, UsageError
from tts_stream.messages import VC_MODELS
from tts_stream.pool import Pool, PoolKey
from tts_stream.server import LocalServer

TIMEOUT = 20.0
MODEL = VC_MODELS[0]


def endpoint(srv: LocalServer) -> Endpoint:
    return Endpoint.resolve(base_url=srv.base_url, api_key=srv.api_key)


async def test_key_session_and_validation() -> None:
    key = PoolKey.make(model=MODEL, voice="v", language_type="English", speech_rate=1.2)
    assert key.session() == {
        "voice": "v", "mode": "server_commit", "response_format": "pcm", "sample_rate": 24000,
        "language_type": "English", "speech_rate": 1.2,
    }  # fmt: skip
    assert key == PoolKey.make(model=MODEL, voice="v", speech_rate=1.2, language_type="English")
    with pytest.raises(UsageError):
        Pool(Endpoint.resolve(base_url="http://127.0.0.1:1"), size=-1)


async def test_cold_then_warm_acquire_and_refill(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=1) as pool:
        cold = await pool.acquire(key)
        assert cold.info.was_warm is False and cold.info.spare_age_s is None
        assert cold.connection.state is p.State.READY  # configured: only text is left
        await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)  # refilled
        await cold.release()
        warm = await pool.acquire(key)
        assert warm.info.was_warm is True
        assert warm.info.acquire_ms < cold.info.acquire_ms
        assert warm.info.spare_age_s is not None and warm.info.spare_age_s >= 0
        await warm.release()
        await warm.release()  # idempotent
        st = await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)
        assert (st.cold_acquires, st.warm_acquires) == (1, 1)
        assert st.dials == 3
    # shutdown finished the spare gracefully: nothing left open on the server
    st_srv = server.stats()  # every spare ended with session.finish
    assert st_srv.sessions_finished == st_srv.sessions_opened - 2  # 2 leases aborted
    assert server.stats().sessions_finished >= 1


async def test_prewarm_dials_in_parallel(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=0, dial_concurrency=4) as pool:
        await pool.prewarm(key, 4)
        assert pool.spares(key) == 4
        leases = [await pool.acquire(key) for _ in range(4)]
        assert all(lease.info.was_warm for lease in leases)
        assert len({id(lease.connection) for lease in leases}) == 4
        for lease in leases:
            await lease.release()
        st = await pool.wait_until(lambda st: st.spares.get(key, 0) == 4)  # refilled to 4
        assert st.dials == 8
        assert 2 <= st.peak_parallel_dials <= 4  # parallel, capped by dial_concurrency
    st_srv = server.stats()  # every spare ended with session.finish
    assert st_srv.sessions_finished == st_srv.sessions_opened - 4  # 4 leases aborted


async def test_spare_is_replaced_before_max_idle_age(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=1, max_idle_s=0.2) as pool:
        await pool.prewarm(key, 1)
        st = await pool.wait_until(lambda st: st.finished_gracefully >= 1 and st.dials >= 2)
        assert st.replaced_aged >= 1
        await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)
        lease = await pool.acquire(key)
        assert lease.info.was_warm and lease.info.spare_age_s is not None
        assert lease.info.spare_age_s < 0.2 + 1.0  # never older than the limit (plus slack)
        await lease.release()
    assert server.stats().sessions_finished >= 1  # session.finish, not an abrupt close


async def test_spare_closed_by_the_server_is_discarded_and_redialled(enroll: Enroll) -> None:
    # The server closes sessions idle for 0.3 s; the pool's own age limit is far away.
    async with (
        asyncio.timeout(TIMEOUT),
        LocalServer(port=0, backend="tone", session_timeout_s=0.3) as srv,
        Pool(endpoint(srv), size=1, max_idle_s=60.0) as pool,
    ):
        key = PoolKey.make(model=MODEL, voice=await enroll(srv))
        await pool.prewarm(key, 1)
        first = pool.stats().dials
        await pool.wait_until(lambda st: st.discarded_closed >= 1)
        await pool.wait_until(lambda st: st.dials > first)  # redialled (after a short backoff)
        lease = await pool.acquire(key)  # never a closed one
        assert lease.connection.is_usable
        await lease.connection.append("Still works.")
        await lease.connection.finish()
        kinds = []
        async for item in lease.connection.events:
            kinds.append(type(item).__name__)
        assert "Audio" in kinds and kinds[-1] == "SessionComplete"
        await lease.release()


async def test_dial_failure_reaches_the_acquirer(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    server.faults.set(refuse_handshake=403)
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=1) as pool:
        t0 = time.monotonic()
        with pytest.raises(ServerError) as info:
            await pool.acquire(key)
        assert info.value.status == 403
        assert time.monotonic() - t0 < 5.0
        st = await pool.wait_until(lambda st: st.dial_failures >= 2)  # the refill failed too
        assert st.spares.get(key, 0) == 0
    with pytest.raises(ClosedError):
        await pool.acquire(key)


async def test_bad_voice_is_refused_at_configuration(server: LocalServer) -> None:
    key = PoolKey.make(model=MODEL, voice="qwen-tts-vc-nobody-voice-20260101000000000-0000")
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=0) as pool:
        with pytest.raises(ServerError, match="not supported|voice"):
            await pool.acquire(key)


# --- warm turn after turn (issue 11) ---------------------------------------------------------


async def test_refill_waits_for_first_audio_then_starts_at_once(
    server: LocalServer, enroll: Enroll
) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=1) as pool:
        await pool.prewarm(key, 1)
        opened = server.stats().sessions_opened
        lease = await pool.acquire(key)
        st = pool.stats()
        # held back while the lease waits for its first audio: no dial competes with it
        assert (st.refills_owed, st.dials_in_flight, st.dials) == (1, 0, 1)
        lease.first_audio()
        assert pool.stats().refills_owed == 0
        lease.first_audio()  # idempotent
        st = await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)
        assert st.dials == 2
        assert server.stats().sessions_opened == opened + 1  # exactly one refill, server-side
        await lease.release()
        await pool.wait_until(lambda st: st.dials_in_flight == 0)
        assert pool.stats().dials == 2  # the release owed nothing more


async def test_acquire_waits_for_the_refill_in_flight(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=1) as pool:
        await pool.prewarm(key, 1)
        first = await pool.acquire(key)
        first.first_audio()  # the refill dials now
        second = await pool.acquire(key)  # no spare yet: waits for that dial
        st = pool.stats()
        assert second.info.was_warm is False
        assert st.dials == 2  # no second dial was started for it
        assert st.cold_reasons == {"refill_in_flight": 1}
        assert server.stats().sessions_opened == 2
        assert second.connection is not first.connection
        assert second.connection.state is p.State.READY
        await first.release()
        await second.release()  # now the refill for the second checkout is dialled
        st = await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)
        assert st.dials == 3 and server.stats().sessions_opened == 3


async def test_cold_reasons_add_up(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT):
        async with Pool(endpoint(server), size=0) as pool:
            lease = await pool.acquire(key)
            await lease.release()
            assert pool.stats().cold_reasons == {"no_spares_kept": 1}
        async with Pool(endpoint(server), size=1) as pool:
            a = await pool.acquire(key)  # first use of the key
            b = await pool.acquire(key)  # a still waits for first audio: nothing dialling
            st = pool.stats()
            assert st.cold_reasons == {"first_use": 1, "busy": 1}
            assert (st.cold_acquires, st.warm_acquires) == (2, 0)
            assert st.leases == {key: 2}
            await a.release()
            await b.release()
            await pool.wait_until(lambda st: st.spares.get(key, 0) == 1)
            c = await pool.acquire(key)
            assert c.info.was_warm and pool.stats().warm_acquires == 1
            await c.release()


async def test_auto_size_follows_peak_concurrency(server: LocalServer, enroll: Enroll) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size="auto", auto_max=3) as pool:
        leases = await asyncio.gather(*(pool.acquire(key) for _ in range(4)))  # 4 at once
        assert pool.stats().targets[key] == 3  # the peak, capped by auto_max
        for lease in leases:
            await lease.release()
        st = await pool.wait_until(lambda st: st.spares.get(key, 0) == 3)
        assert st.cold_acquires == 4 and st.leases == {}
        opened = server.stats().sessions_opened
        assert opened == 4 + 3  # four dialled for the callers, three spares
        again = await asyncio.gather(*(pool.acquire(key) for _ in range(3)))  # 3 at once
        assert all(lease.info.was_warm for lease in again)  # each caller found a spare
        assert server.stats().sessions_opened == opened  # and no dial was needed
        for lease in again:
            await lease.release()
    with pytest.raises(UsageError, match="auto"):
        Pool(endpoint(server), size="many")  # type: ignore[arg-type]


async def test_closing_the_pool_fails_an_acquire_still_waiting(
    server: LocalServer, enroll: Enroll
) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT):
        async with Pool(endpoint(server), size=0) as pool:
            waiting = asyncio.create_task(pool.acquire(key))
            await asyncio.sleep(0)  # it is waiting for its dial now
            assert pool.stats().leases == {key: 1}
        with pytest.raises(ClosedError, match="closed"):
            await waiting


# --- prewarm: one bound per dial, a partial prewarm reports what it got -------------------------


async def test_prewarm_with_refused_dials_keeps_what_connected_and_says_how_many(
    server: LocalServer, enroll: Enroll
) -> None:
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    async with asyncio.timeout(TIMEOUT), Pool(endpoint(server), size=0, dial_concurrency=2) as pool:
        server.faults.set(refuse_handshake=503, times=2)  # the next two dials are refused
        with pytest.raises(HandshakeRejected) as info:
            await pool.prewarm(key, 5)
        assert "3 of 5 warm spares ready" in " ".join(info.value.__notes__)
        assert pool.spares(key) == 3  # the dials that connected stay in the pool
        st = pool.stats()
        assert (st.dials, st.dial_failures, st.dials_in_flight) == (5, 2, 0)
        server.faults.set(refuse_handshake=503, times=1)
        assert await pool.prewarm(key, 5, allow_partial=True) == 4  # a count, no error
        assert await pool.prewarm(key, 5) == 5  # the last missing one, nothing refused now
        leases = [await pool.acquire(key) for _ in range(5)]
        assert all(lease.info.was_warm for lease in leases)
        for lease in leases:
            await lease.release()


class SlowDoor:
    """A TCP relay to the local server that holds every new connection ``delay`` s before
    relaying a byte: each dial through it takes that long (a distant or busy service)."""

    def __init__(self, port: int, delay: float) -> None:
        self.port, self.delay = port, delay
        self.accepted = 0
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._listener = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._listener.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        self._listener.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await asyncio.sleep(self.delay)
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (asyncio.create_task(pipe(r, uw)), asyncio.create_task(pipe(ur, w))):
            self._tasks.add(task)


async def test_prewarm_bounds_each_dial_not_all_of_them(
    server: LocalServer, enroll: Enroll
) -> None:
    """24 dials of 0.25 s each, one at a time: 6 s in all, longer than any one dial may take
    (open + configure time-outs + 5 s = 6 s). Each dial is bounded on its own, so all of
    them are made; a shared bound for the whole prewarm used to raise Timeout here."""
    key = PoolKey.make(model=MODEL, voice=await enroll(server))
    port = int(server.base_url.rsplit(":", 1)[1])
    async with SlowDoor(port, 0.25) as url:
        ep = Endpoint.resolve(base_url=url, api_key=server.api_key)
        async with (
            asyncio.timeout(TIMEOUT),
            Pool(ep, size=0, dial_concurrency=1, open_timeout=0.5, configure_timeout=0.5) as pool,
        ):
            t0 = time.monotonic()
            assert await pool.prewarm(key, 24) == 24
            assert time.monotonic() - t0 > 6.0  # longer than one dial's bound: the point
            st = pool.stats()
            assert (st.dials, st.dial_failures, st.peak_parallel_dials) == (24, 0, 1)
