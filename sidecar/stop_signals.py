"""SIGINT and SIGTERM during `kt serve`'s start-up: held, then answered by a clean stop.

Python answers SIGINT by raising KeyboardInterrupt wherever the main thread happens to
be (an import, gRPC's start, a half-bound port) and SIGTERM by dying at once, so a signal
in the first moments of `kt serve` would print a traceback, or end a `--workers` child
by the signal and its supervisor with it. Instead `kt` blocks both from its first line;
whoever can stop cleanly (the sidecar's event loop, the workers' supervisor) installs its
handler and then releases them: a signal that came meanwhile is delivered at that moment,
to that handler. A command that ends before anyone took them over drops them (it has
already finished).

Not covered: the interpreter's own start, before any line of `kt` runs (tens of
milliseconds; Python prints its own message there).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Block the stop signals in this thread for the block; at its end a signal still
    pending is discarded (not raised), and the previous mask and handlers come back."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        # POSIX: ignoring a pending signal discards it, blocked or not
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)


def release() -> None:
    """Deliver the stop signals from now on (to the handlers just installed)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
