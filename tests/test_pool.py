"""The warm-spare pool against the real LocalServer: warm/cold acquires, refill, idle age,
stale spares, parallel dials, graceful shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import Enroll
from tts_stream import protocol as p
from tts_stream.config import Endpoint
from tts_stream.errors import ClosedError, ServerError, UsageError
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
