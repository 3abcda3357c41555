"""The link watch's verdicts (sidecar/backends/link_watch.py) on a fake link, on a real
event loop: silence of the store fails a call, a reply in hand or in the socket never
counts as silence, and a call past its deadline on a link that answers is shed."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from sidecar.backends.link_watch import LinkWatch


class FakeLink:
    def __init__(self) -> None:
        self.last_reply_at = time.monotonic()
        self.pending: list = []
        self.connected = True
        self.waiting = False

    def bytes_waiting(self) -> bool:
        return self.waiting


class Call:
    def __init__(self, deadline_s: float = 10.0) -> None:
        self.written_at = time.monotonic()
        self.deadline = self.written_at + deadline_s
        self.reply: Optional[bool] = None  # True once "read off the link"
        self.verdict: Optional[tuple[bool, float]] = None

    def answered(self) -> bool:
        return self.reply is not None or self.verdict is not None

    def give_up(self, store_silent: bool, silent_for: float) -> None:
        self.verdict = (store_silent, silent_for)


async def _run(link: FakeLink, calls: list[Call], seconds: float, silence_s: float = 0.02,
               during=None) -> None:
    watch = LinkWatch(lambda: link, silence_s)
    for c in calls:
        watch.owe(c)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if during is not None:
            during()
        await asyncio.sleep(0.002)
    watch.close()


def test_a_silent_store_fails_the_calls_it_owes():
    link, call = FakeLink(), Call()
    link.pending.append(object())
    asyncio.run(_run(link, [call], 0.2))
    assert call.verdict is not None and call.verdict[0] is True
    assert call.verdict[1] > 0.02


def test_a_reply_read_but_not_yet_handed_over_is_not_silence():
    # every reply owed has been read (nothing pending on the link), the calls' own
    # callbacks are still queued behind a busy loop: the store is silent about nothing
    link, call = FakeLink(), Call()
    asyncio.run(_run(link, [call], 0.2))
    assert call.verdict is None


def test_bytes_waiting_in_the_socket_put_the_verdict_off():
    link, call = FakeLink(), Call()
    link.pending.append(object())
    link.waiting = True
    asyncio.run(_run(link, [call], 0.2))
    assert call.verdict is None


def test_a_call_past_its_deadline_on_a_link_that_answers_is_shed():
    link, call = FakeLink(), Call(deadline_s=0.05)
    link.pending.append(object())

    def replies_keep_coming() -> None:
        link.last_reply_at = time.monotonic()

    asyncio.run(_run(link, [call], 0.2, during=replies_keep_coming))
    assert call.verdict is not None and call.verdict[0] is False
