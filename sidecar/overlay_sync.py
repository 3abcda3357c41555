"""The policy served = the policy file + the management API's overlay of holders
(sidecar/policy/overlay.py), kept in step on every sidecar of a fleet.

``OverlayKeeper`` keeps the file's bytes and the overlay it last read from its store
(sidecar/backends/overlay_store.py), compiles the two together through the one path every
policy takes (in a thread: a large policy takes seconds; decisions go on meanwhile) and
swaps the result in on the event loop, as a file reload does (``apply``). A change made
through this sidecar is swapped in at once; one made through another sidecar is seen by
polling the store's version every ``poll_s`` (250 ms: one ``HGET`` on Redis), so every
sidecar serves it within a second. A reload of the file layers the same overlay over the
new file (``load_file``, the reloader's loader).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Callable, Optional

from sidecar.backends.base import BackendError
from sidecar.backends.overlay_store import Fields, OverlayStore
from sidecar.burstlog import BurstLog
from sidecar.metrics import Metrics
from sidecar.policy import overlay as ov
from sidecar.policy.load import CompiledPolicy, PolicyError, read_policy_file

log = logging.getLogger("kt.overlay")

POLL_S = 0.25


class OverlayKeeper:
    def __init__(self, store: OverlayStore, source: str, raw: Optional[bytes],
                 serving: Callable[[], CompiledPolicy],
                 apply: Callable[[CompiledPolicy], None], metrics: Metrics,
                 poll_s: float = POLL_S) -> None:
        self.store = store
        self.source = source  # the policy file's name, as errors say it
        self.raw = raw  # None: this server was handed a compiled policy, no file to layer
        self.serving = serving  # the policy being served
        self.apply = apply  # swaps a policy in: plain assignments, on the event loop
        self.poll_s = poll_s
        self.metrics = metrics
        self.overlay = ov.Overlay()
        self.served_version = 0  # the overlay version of the policy being served
        self.aside: frozenset[str] = frozenset()  # holders set aside in the policy served
        self._loaded: Optional[tuple[CompiledPolicy, bytes, int]] = None
        self._task: Optional[asyncio.Task] = None
        self.lock = asyncio.Lock()  # one change at a time through this sidecar
        self.poll_errors = BurstLog(log)

    # --- start, poll, stop -----------------------------------------------------------
    async def start(self) -> Optional[CompiledPolicy]:
        """Read the store; the layered policy to serve, or None when the overlay is empty.
        A holder whose stored block does not compile over this file is refused (set aside,
        compile_here), never served the file's entry, which may hand it limits an operator
        took away; an overlay no holder of which can be blamed stops the start (PolicyError). A store
        that does not answer stops it only where the store is a file; Redis down at start:
        the file alone serves (decisions follow the backend's failure modes meanwhile) and
        the poll serves the overlay as soon as Redis answers."""
        try:
            self.overlay = await self.store.load()
        except BackendError as exc:
            if self.store.required_at_start:
                raise
            self.metrics.overlay_applied.labels("error").inc()
            log.error("overlay %s not readable at start, serving the policy file alone until "
                      "it is: %s", self.store.where, exc)
            self.served_version = -1  # the poll reads the store whole once it answers
            return None
        self.served_version = self.overlay.version
        self.metrics.overlay_version.set(self.overlay.version)
        if self.overlay.empty():
            return None
        return await asyncio.to_thread(self.compile_here, self.overlay)

    def run(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.store.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except (BackendError, PolicyError) as exc:
                self.metrics.overlay_applied.labels("error").inc()
                self.poll_errors.warning("overlay %s: not applied, still serving overlay "
                                         "version %d: %s", self.store.where,
                                         self.served_version, exc)
            except Exception:  # noqa: BLE001 - the poll must outlive any bug
                log.exception("overlay poll failed")

    async def refresh(self) -> bool:
        """Serve the stored overlay if it is not the one served; whether it swapped."""
        version = await self.store.version()
        if version == self.served_version and version == self.overlay.version:
            return False
        async with self.lock:
            return await self.refresh_locked()

    async def sync_locked(self) -> None:
        """Under ``lock``: serve the store's overlay if another sidecar changed it since
        the last poll (a change then starts from what the store holds)."""
        if await self.store.version() != self.overlay.version:
            await self.refresh_locked()

    async def refresh_locked(self) -> bool:
        overlay = await self.store.load()
        if overlay.version == self.served_version:
            self.overlay = overlay
            return False
        try:
            policy = await asyncio.to_thread(self.compile_here, overlay)
        except PolicyError:
            self._serve_freezes(overlay)
            raise
        self.overlay = overlay
        self._serve(policy, overlay.version)
        return True

    def _serve_freezes(self, overlay: ov.Overlay) -> None:
        """The stored overlay does not compile over this sidecar's file (a block valid over
        another sidecar's file, mid-rollout): its freeze marks still apply, over the policy
        being served. A freeze is the brake of an incident and needs no compile; the poll
        goes on failing (counted) until the blocks compile here too. (The marks alone: the
        holders below a frozen one are found in the layered document, which did not
        compile here; compile_here sets aside what it can blame first, so this is the case
        of an overlay whose errors name no holder.)"""
        serving = self.serving()
        frozen = frozenset(overlay.frozen)
        if serving.frozen != frozen:
            self.apply(replace(serving, frozen=frozen))
            log.warning("overlay version %d does not compile over %s: its %d freeze marks "
                        "served, its holders' blocks not", overlay.version, self.source,
                        len(frozen))

    # --- compile and serve ---------------------------------------------------------------
    def compile(self, overlay: ov.Overlay, raw: Optional[bytes] = None) -> CompiledPolicy:
        """The file with ``overlay`` over it (in a thread); raises PolicyError. A server
        handed a compiled policy (no file: tests) layers only the freeze marks."""
        raw = raw if raw is not None else self.raw
        if raw is None:
            return replace(self.serving(), frozen=frozenset(overlay.frozen))
        return ov.compile_layered(raw, self.source, overlay)

    def compile_aside(self, overlay: ov.Overlay) -> tuple[CompiledPolicy, frozenset[str]]:
        """The file with ``overlay`` over it, and the holders set aside to compile it
        (ov.compile_quarantined; in a thread). Raises PolicyError."""
        if self.raw is None:
            return self.compile(overlay), frozenset()
        return ov.compile_quarantined(self.raw, self.source, overlay)

    def compile_here(self, overlay: ov.Overlay) -> CompiledPolicy:
        """What this sidecar serves of a stored overlay (in a thread): the holders whose
        blocks do not compile over this sidecar's file set aside and refused
        (ov.compile_quarantined), every other change served; counted and logged, so the
        alert on overlay errors fires until the files agree. Raises PolicyError only when
        no holder can be blamed."""
        policy, aside = self.compile_aside(overlay)
        self.aside = aside
        self.metrics.overlay_set_aside.set(len(aside))
        if aside:
            self.metrics.overlay_applied.labels("error").inc()
            self.poll_errors.warning(
                "overlay version %d: %d holders' blocks do not compile over %s, refused here "
                "until they do: %s", overlay.version, len(aside), self.source,
                ", ".join(sorted(aside)[:10]))
        return policy

    def _serve(self, policy: CompiledPolicy, version: int) -> None:
        self.apply(policy)
        self.served_version = version
        self.metrics.overlay_applied.labels("ok").inc()
        self.metrics.overlay_version.set(version)
        log.info("policy with overlay version %d: %s (%d tenants)", version, policy.digest,
                 len(policy.tenants))

    def load_file(self, path: str) -> CompiledPolicy:
        """The policy reloader's loader: the file read anew, the overlay over it (a thread)."""
        raw = read_policy_file(path)
        overlay = self.overlay
        policy = ov.compile_layered(raw, str(path), overlay)
        self._loaded = (policy, raw, overlay.version)
        return policy

    def served(self, policy: CompiledPolicy) -> None:
        """A policy was swapped in (on the loop): if the reloader loaded it, its file's
        bytes are the ones to layer from now on (the poll re-layers a newer overlay)."""
        loaded = self._loaded
        if loaded is not None and loaded[0] is policy:
            self.raw, self.served_version = loaded[1], loaded[2]
            self._loaded = None

    async def commit(self, fields: Fields, overlay: ov.Overlay,
                     policy: CompiledPolicy) -> tuple[int, Fields, str]:
        """Write ``fields`` (what turns the overlay served into ``overlay``, whose compiled
        ``policy`` the caller checked) and serve it; (the new version, the fields before,
        "" or why this sidecar does not serve it yet). Called under ``lock``. Another
        sidecar's change in between: the store is read whole and served (the caller's
        change is in it). Raises BackendError only when the store did not confirm the
        change: once it did, the change is made (every other sidecar serves it), whatever
        this one can serve."""
        version, before = await self.store.change(fields)
        if version == self.overlay.version + 1:
            self.overlay = ov.Overlay(version=version, holders=overlay.holders,
                                      frozen=overlay.frozen)
            self._serve(policy, version)
            return version, before, ""
        self.served_version = -1
        try:
            await self.refresh_locked()
        except (BackendError, PolicyError) as exc:
            self.metrics.overlay_applied.labels("error").inc()
            return version, before, str(exc)[:1000]
        return version, before, ""
