"""An in-process sidecar on ephemeral loopback ports, on its own event-loop thread,
with an injectable clock: gRPC tests call it through a real channel."""
from __future__ import annotations

import asyncio
import threading
from typing import Optional

import uvloop

from sidecar.backends.base import Backend
from sidecar.backends.memory import MemoryBackend
from sidecar.ledger.recorder import Ledger
from sidecar.policy.load import CompiledPolicy, parse_policy
from sidecar.server import ServerConfig, Sidecar
from tests.support.clock import ManualClock


class RunningSidecar:
    """Start with ``with RunningSidecar(policy_yaml) as sc:``; always stopped on exit."""

    def __init__(self, policy_yaml: str, backend: Optional[Backend] = None,
                 clock: Optional[ManualClock] = None, state_file: str = "",
                 policy_path: Optional[str] = None, ledger: Optional[Ledger] = None,
                 config: Optional[dict] = None) -> None:
        self.clock = clock or ManualClock()
        self.policy: CompiledPolicy = parse_policy(policy_yaml.encode(), "<test policy>")
        self.backend = backend or MemoryBackend(state_file=state_file, clock=self.clock)
        cfg = ServerConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0",
                           admin_addr="127.0.0.1:0", policy_path=policy_path,
                           reload_interval_s=3600, **(config or {}))
        # no ledger unless the test gives one (the default would write under the cwd)
        self.sidecar = Sidecar(cfg, policy=self.policy, backend=self.backend,
                               ledger=ledger if ledger is not None else Ledger(None))
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "RunningSidecar":
        self._thread.start()
        try:
            self.run(self.sidecar.start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.sidecar.grpc_server is not None:
                self.run(self.sidecar.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.sidecar.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.http_port}"

    @property
    def admin_base(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.admin_port}"
