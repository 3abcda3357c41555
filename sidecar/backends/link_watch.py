"""Which calls on the Redis link have waited too long, and why: the store, or the sidecar.

A call owed a reply is given up on for one of two reasons, and each has its own answer:

- **The store does not answer**: nothing at all has been read on the link for
  ``silence_s`` (the policy's ``timeout_ms``) while this call was owed. The store is down,
  stalled or unreachable: the service answers by the configured failure mode
  (BackendTimeout).
- **The call missed its deadline while the store answered**: replies kept coming on the
  link, but this one's did not come before its caller stops waiting (``deadline_s``,
  derived from Envoy's ext_authz timeout). The store is up; the work in front of the
  call (this sidecar's busy loop, the pipeline behind a burst) made it late: the service
  sheds it with its own answer (BackendOverloaded), never by the failure mode.

Why not one timer per call, as before: a timer measures the event loop, not the store.
On a loop busy with a burst, a batch's timer fired before its reply, already in the
socket, was read, and a healthy store's bursts were answered by the failure mode. Here
one watch runs while replies are owed, and each verdict is taken two loop turns after its
timer fired: the loop polls the socket in between, so a reply that has arrived is read
(and counts as the link's sign of life) before any call is given up on. And a verdict
is put off while bytes wait unread in the socket: this process was descheduled or busy
since its last poll, and the store had answered. A loop that is late only makes the
verdict later, never wrong.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional, Protocol, Sized

# Envoy's ext_authz timeout as `kt envoy-config` prints it (EnvoyOptions.authz_timeout_s;
# Envoy's own default too): how long the caller of a decision waits
CALLER_WAIT_S = 0.2
# kept of it for the answer's way back to Envoy and the sidecar's own turn before the call
ANSWER_MARGIN_S = 0.05


def deadline_s(timeout_ms: int) -> float:
    """How long a call may wait for its reply while the store answers: what its caller
    waits, less the margin; never less than the store's own silence allowance (a policy
    that gives the store a second gives each call that second)."""
    return max(CALLER_WAIT_S - ANSWER_MARGIN_S, timeout_ms / 1000.0)


class Owed(Protocol):
    """A call (or a batch of them) written to the link, waiting for its reply."""

    written_at: float  # monotonic s: when it was handed to the link
    deadline: float  # monotonic s: when its callers stop waiting

    def answered(self) -> bool:
        """Its reply has been read (its callers are answered on the loop's next turns, which
        may come after a verdict: a reply in hand is never the store's silence)."""

    def give_up(self, store_silent: bool, silent_for: float) -> None:
        """Answer the callers now: the store did not answer (``store_silent``), or the
        call is past its deadline on a link that answered other calls meanwhile."""


class Link(Protocol):
    last_reply_at: float  # monotonic s: the last reply read (or when one became owed)

    @property
    def pending(self) -> Sized: ...  # replies owed by the store, not read yet (read only)

    @property
    def connected(self) -> bool: ...

    def bytes_waiting(self) -> bool: ...


class LinkWatch:
    def __init__(self, link: Callable[[], Optional[Link]], silence_s: float,
                 on_judged: Optional[Callable[[], None]] = None) -> None:
        """``link()``: the current link (None before start). ``on_judged``: run after each
        verdict (the backend drops a link that has hung for long)."""
        self._link = link
        self.silence_s = silence_s
        self._on_judged = on_judged
        self._owed: list[Owed] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._judging = False

    @property
    def interval_s(self) -> float:
        return max(0.002, self.silence_s / 2)

    def owe(self, call: Owed) -> None:
        self._owed.append(call)
        if self._judging:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval_s
        # (a timer armed before silence_s was lowered would come too late)
        if self._timer is not None and self._timer.when() > due:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._judging = True
        loop = asyncio.get_running_loop()
        # two turns: callbacks queued now run before the next poll of the sockets; the
        # one they queue runs after it, when a reply already in the socket has been read
        loop.call_soon(loop.call_soon, self._judge)

    def _judge(self) -> None:
        self._judging = False
        # the time first, then the socket: were this process descheduled in between, the
        # store's answer meanwhile is in the socket, and not counted as silence
        now = time.monotonic()
        link = self._link()
        up = link is not None and link.connected
        last_read = link.last_reply_at if link is not None else 0.0
        # every reply owed has been read: the store is silent about nothing
        owed_by_store = not up or (link is not None and len(link.pending) > 0)
        if up and link is not None and link.bytes_waiting():
            # the store has answered: judge again once the loop has read it
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)
            return
        keep: list[Owed] = []
        for call in self._owed:
            if call.answered():
                continue
            # silence counts from the later of the last reply and this call's sending
            silent_for = now - max(last_read, call.written_at) if up else now - call.written_at
            if silent_for > self.silence_s and owed_by_store:
                call.give_up(True, silent_for)
            elif now >= call.deadline:
                # late: the store's fault only if it has sent nothing since this was sent
                call.give_up(last_read <= call.written_at, silent_for)
            else:
                keep.append(call)
        self._owed = keep
        if self._on_judged is not None:
            self._on_judged()
        if keep:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._owed.clear()
