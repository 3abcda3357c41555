"""Policy hot reload: the policy file, checked every few seconds, swapped in whole when it
changed and compiles; a bad policy never replaces a good one, and a change of the backend
or ledger section (which need a restart) is refused. Counted and logged either way."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable, Optional

from sidecar.metrics import Metrics
from sidecar.policy.load import CompiledPolicy, PolicyError, load_policy

log = logging.getLogger("kt.server")


class PolicyReloader:
    def __init__(self, path: str, interval_s: float, metrics: Metrics,
                 serving: Callable[[], CompiledPolicy],
                 apply: Callable[[CompiledPolicy], None],
                 load: Callable[[str], CompiledPolicy] = load_policy) -> None:
        self.path = path
        self.interval_s = interval_s
        self.metrics = metrics
        self.serving = serving  # the policy being served
        self.apply = apply  # swaps one in: plain assignments, no I/O, on the event loop
        # reads and compiles the file (the server's: with the management API's overlay of
        # holders over it, sidecar/overlay_sync.py)
        self.load = load
        self._stamp = self.stamp()

    def stamp(self) -> Optional[tuple]:
        # stat the resolved path: a Kubernetes ConfigMap update swaps a symlink,
        # which changes the target's inode even when mtime looks older
        try:
            st = Path(self.path).resolve().stat()
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    async def run(self) -> None:
        """Checks the file every interval_s. Reading, parsing and compiling run in a
        thread (a 100,000-tenant policy takes seconds): decisions go on meanwhile, on the
        policy being served, and the new one is swapped in by one assignment on the loop.
        Nothing stops this loop but cancellation: every failure is counted and logged."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                new = await loop.run_in_executor(None, self.load_if_changed)
                if new is not None:
                    self.swap(new)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reloader must outlive any bug or bad file
                self.metrics.policy_reloads.labels("error").inc()
                log.exception("policy reload failed unexpectedly, still serving %s",
                              self.serving().digest)

    def reload_if_changed(self) -> bool:
        """One reload check in the caller's thread (tests; the loop uses run)."""
        new = self.load_if_changed()
        return new is not None and self.swap(new)

    def load_if_changed(self) -> Optional[CompiledPolicy]:
        """The changed file's policy, or None (unchanged, or refused: counted and logged).
        Safe to run in a thread: it reads the served policy, never writes it."""
        stamp = self.stamp()
        if stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp
        serving = self.serving()
        try:
            new = self.load(self.path)
        except PolicyError as exc:
            # a bad policy never replaces a good one
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload failed, still serving %s: %d error(s):\n%s",
                      serving.digest, len(exc.errors), exc)
            return None
        except Exception:  # noqa: BLE001 - counted and logged, never fatal to the reloader
            self.metrics.policy_reloads.labels("error").inc()
            log.exception("policy reload failed, still serving %s", serving.digest)
            return None
        if new.digest == serving.digest:
            return None
        if type(new.backend) is not type(serving.backend) or new.backend != serving.backend:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload: the backend section changed; that needs a restart. "
                      "Still serving %s", serving.digest)
            return None
        if new.ledger != serving.ledger:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload: the ledger section changed; that needs a restart. "
                      "Still serving %s", serving.digest)
            return None
        return new

    def swap(self, new: CompiledPolicy) -> bool:
        """Swap in a loaded policy: plain assignments, no I/O, on the event loop."""
        self.metrics.policy_info.clear()
        self.metrics.policy_info.labels(new.source, new.digest).set(1)
        self.apply(new)
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy reloaded: %s (%d tenants)", new.digest, len(new.tenants))
        return True
