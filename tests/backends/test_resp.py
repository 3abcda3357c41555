"""The hot path's pipelined Redis connection (sidecar/backends/resp.py) against a real
Valkey: replies reach the callers that sent the commands, whatever the order in which
callers connect, and a link that was dropped cannot disturb the one that replaced it."""
from __future__ import annotations

import asyncio
import itertools

import pytest

from sidecar.backends.redis import pack
from sidecar.backends.resp import (BACKOFF_BASE_S, BACKOFF_CAP_S, ConnectionLost,
                                   PipelinedConnection, backoff_delay)
from tests.support.procs import workdir
from tests.support.valkey import Valkey


def echoes(conn: PipelinedConnection, tag: str, n: int) -> list[asyncio.Future]:
    return [conn.submit(pack("ECHO", f"{tag}-{i}")) for i in range(n)]


def test_connect_on_an_open_link_keeps_it_and_every_reply_reaches_its_caller(valkey):
    # the race seen under a burst at start-up: a batch that found the link closed waits
    # for a connect, and resumes after another caller opened it; a second link would have
    # the first link's replies handed to the second link's callers
    async def main() -> None:
        conn = PipelinedConnection("127.0.0.1", valkey.port, 1.0)
        await conn.connect()
        first = conn.transport
        in_flight = echoes(conn, "a", 50)  # replies still owed on the link
        await conn.connect()
        assert conn.transport is first  # no second link
        later = echoes(conn, "b", 50)
        replies = await asyncio.gather(*in_flight, *later)
        assert replies == [f"a-{i}".encode() for i in range(50)] + \
            [f"b-{i}".encode() for i in range(50)]
        conn.close()

    asyncio.run(main())


def test_concurrent_connects_open_one_link(valkey):
    async def main() -> None:
        conn = PipelinedConnection("127.0.0.1", valkey.port, 1.0)
        opened = []
        real = asyncio.get_running_loop().create_connection

        async def counting(*a, **kw):
            opened.append(1)
            return await real(*a, **kw)

        asyncio.get_running_loop().create_connection = counting  # type: ignore[method-assign]
        # some callers ask while the first connect is under way, some after it finished
        first = [asyncio.ensure_future(conn.connect()) for _ in range(5)]
        await asyncio.gather(*first)
        await asyncio.gather(*(conn.connect() for _ in range(5)))
        assert len(opened) == 1
        assert await conn.call(pack("PING")) == b"PONG"
        conn.close()

    asyncio.run(main())


def test_a_dropped_links_late_callbacks_leave_its_replacement_alone(valkey):
    async def main() -> None:
        conn = PipelinedConnection("127.0.0.1", valkey.port, 1.0)
        await conn.connect()
        old = conn.protocol
        assert old is not None
        owed = conn.submit(pack("ECHO", "old"))
        conn.lose(ConnectionError("test: dropped"))
        with pytest.raises(ConnectionError):
            await owed  # failed by the drop, never answered by the old link
        await conn.connect()
        waiting = echoes(conn, "new", 3)
        # what the old link may still deliver after being replaced: a reply, then its close
        old.data_received(b"$3\r\nold\r\n")
        old.connection_lost(None)
        assert conn.connected
        assert await asyncio.gather(*waiting) == [b"new-0", b"new-1", b"new-2"]
        conn.close()

    asyncio.run(main())


def test_setup_commands_run_before_any_call_written_behind_them(valkey):
    # SELECT in the setup: a call must run after it, on the selected database; the link
    # counts as connected only once the whole setup has been answered
    async def main() -> None:
        conn = PipelinedConnection("127.0.0.1", valkey.port, 1.0,
                                   setup=(pack("CLIENT", "SETNAME", "kt-test"), pack("SELECT", 3)))
        opening = asyncio.ensure_future(conn.connect())
        while conn.transport is None:
            await asyncio.sleep(0)
        assert not conn.connected  # the TCP link is up, its setup not answered yet
        behind = asyncio.ensure_future(conn.call(pack("CLIENT", "INFO")))
        await opening
        info = (await behind).decode()
        assert " name=kt-test " in f" {info} " and " db=3 " in f" {info} ", info
        conn.close()

    asyncio.run(main())


@pytest.mark.valkey
def test_a_server_that_accepts_but_does_not_answer_gets_no_call_and_a_backoff():
    # a stopped server's kernel still completes the TCP handshake: the link must not count
    # as connected (nor carry calls) until the setup is answered, and a failed attempt
    # makes the next ones wait (no connection per caller)
    with workdir() as d, Valkey(d) as v:
        async def main() -> None:
            conn = PipelinedConnection("127.0.0.1", v.port, 0.2, setup=(pack("PING"),))
            v.pause()
            try:
                with pytest.raises(ConnectionLost, match="no answer within 200 ms"):
                    await conn.connect()
                assert not conn.connected and conn.failed == 1 and conn.backing_off() > 0
                with pytest.raises(ConnectionLost, match="next attempt in"):
                    await conn.call(pack("ECHO", "never written"))  # at once, no new link
                assert conn.failed == 1
            finally:
                v.resume()
            while conn.backing_off():
                await asyncio.sleep(0.01)
            assert await conn.call(pack("ECHO", "back")) == b"back"
            assert (conn.opened, conn.failures) == (1, 0)  # a success resets the backoff
            conn.close()

        asyncio.run(main())


def test_backoff_doubles_with_jitter_up_to_its_cap():
    low = [backoff_delay(n, lambda: 0.0) for n in range(1, 12)]
    high = [backoff_delay(n, lambda: 1.0) for n in range(1, 12)]
    assert low[0] == BACKOFF_BASE_S / 2 and high[0] == BACKOFF_BASE_S
    assert all(b == 2 * a for a, b in itertools.pairwise(high) if b < BACKOFF_CAP_S)
    assert max(high) == BACKOFF_CAP_S and max(low) == BACKOFF_CAP_S / 2
    assert backoff_delay(10**6, lambda: 1.0) == BACKOFF_CAP_S  # no overflow


@pytest.mark.valkey
def test_a_caller_cancelled_while_connecting_does_not_fail_the_others():
    # the first caller's request is given up on (its task cancelled) while the link's
    # setup (SELECT) is still unanswered; the callers waiting on the same connect must
    # get their replies, not a connection error and the failure mode
    with workdir() as d, Valkey(d) as v:
        async def main() -> list:
            conn = PipelinedConnection("127.0.0.1", v.port, 2.0,
                                       setup=(pack("SELECT", "1"),))
            v.pause()  # the TCP connect completes; SELECT's reply waits
            try:
                first = asyncio.ensure_future(conn.call(pack("ECHO", "first")))
                others = [asyncio.ensure_future(conn.call(pack("ECHO", f"other-{i}")))
                          for i in range(3)]
                for _ in range(20):
                    await asyncio.sleep(0.01)
                first.cancel()
                await asyncio.sleep(0.05)
            finally:
                v.resume()
            try:
                return await asyncio.wait_for(asyncio.gather(*others), 5)
            finally:
                conn.close()

        assert asyncio.run(main()) == [f"other-{i}".encode() for i in range(3)]
